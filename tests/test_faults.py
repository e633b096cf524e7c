"""Faults: bad input to each command ends in one ``error:`` line and the right exit status;
checkpoints survive a kill mid-save and refuse to load when a byte of them changed.

The commands run in this process (their ``main(argv)``) on the 2-image data set of
test_cli; one check runs ``python -m fastmask.train`` as a user does, with and without
``--debug``, and one kills a process while it writes a checkpoint.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from fastmask import evaluate as evaluate_cli
from fastmask import predict as predict_cli
from fastmask import train as train_cli
from fastmask.config import ConfigError, load_config, to_dict
from fastmask.data import DatasetError
from fastmask.engine.builder import build_model, model_arch
from fastmask.engine.checkpoint import (FORMAT, CheckpointError, load_checkpoint, read_model_file,
                                        remove_stale_temporaries, save_atomic)
from fastmask.engine.cli import resolve_config_path
from test_cli import _dataset

# What may precede the error line on stderr: the trainer's log lines, notes and progress bars.
LOG_PREFIXES = ("[", "info:", "train:", "evaluate:")
CLASS_NAMES = ["__background__", "p", "q", "r"]  # test_cli's data set: category ids 4, 6, 9


def _run(main, argv, capsys):
    """(exit status, the one error line) of a command that must fail."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    return info.value.code, _error_line(err)


def _error_line(err: str) -> str:
    """The error line of ``err``, checked to be the only one, the last, and without a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    # Anything else is a log line: a message continued on a second line would show up here.
    assert all(line.startswith(LOG_PREFIXES) for line in lines[:-1]), err
    return errors[0]


def _assert_names(line: str, words) -> None:
    for word in words:
        assert str(word) in line, f"{word!r} not in {line!r}"


def _write(path, content):
    """``path`` after writing ``content`` (str or bytes) to it."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _read_only(root):
    """A folder in ``root`` that its owner cannot write in."""
    folder = root / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _flip_byte(path, record=None, at=0.5):
    """Change one byte inside a record of a zip-format checkpoint (its largest one by default)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(record) if record else max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The record's local header: 30 bytes, then its name and extra field, whose lengths it holds at 26 and 28.
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + int(info.file_size * at)] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data):
    """An untrained fastmask checkpoint of the smoke model for test_cli's data set (no training needed)."""
    ann, img = data
    cfg = load_config(resolve_config_path("smoke"), [
        "device=cpu", "num_threads=1", f"data.train.annotations={ann}", f"data.train.images={img}",
        f"data.val.annotations={ann}", f"data.val.images={img}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASS_NAMES))
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_atomic({"format": FORMAT, "model": model.state_dict(), "iteration": 0, "config": to_dict(cfg),
                 "meta": {"num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES,
                          "label_to_cat_id": {1: 4, 2: 6, 3: 9}, "arch": model_arch(cfg.model, len(CLASS_NAMES))}},
                path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint):
    """Broken model files, by name."""
    root = tmp_path_factory.mktemp("files")
    good = checkpoint.read_bytes()
    out = {"missing": root / "missing.pth", "folder": root,
           "truncated": _write(root / "truncated.pth", good[: len(good) // 2]),
           "empty": _write(root / "empty.pth", b""),
           "random": _write(root / "random.pth", os.urandom(4096)),
           "text": _write(root / "notes.txt", "not a checkpoint\n"),
           "zip": root / "other.zip", "pickled": root / "module.pth", "tensor": root / "tensor.pth",
           "flipped": _write(root / "flipped.pth", good)}
    with zipfile.ZipFile(out["zip"], "w") as z:
        z.writestr("a.txt", "an archive, not from torch.save")
    torch.save({"model": torch.nn.Linear(2, 2)}, out["pickled"])
    torch.save(torch.zeros(3), out["tensor"])
    _flip_byte(out["flipped"])
    return out


# --------------------------------------------------------------------------- train: data


def _train_argv(root, ann, img, *extra):
    return ["--config", "smoke", "--set", f"output_dir={root / 'out'}", "device=cpu", "num_threads=1",
            f"data.train.annotations={ann}", f"data.train.images={img}", f"data.val.annotations={ann}",
            f"data.val.images={img}", "solver.max_iter=1", "data.batch_size=1", "data.aspect_ratio_grouping=false",
            *extra]


def _ann(k, **fields):
    """An edit of the JSON: update annotation ``k`` with ``fields``."""
    return lambda d: d["annotations"][k].update(fields)


def _write_image(name, content):
    """A file edit: replace the image ``name`` with ``content`` (bytes) or a function of its bytes."""
    def prep(root):
        path = root / "img" / name
        path.write_bytes(content(path.read_bytes()) if callable(content) else content)
    return prep


DATA_CASES = [
    # (JSON edit, file edit, extra overrides, words the error line must hold)
    pytest.param(None, lambda r: (r / "ann.json").unlink(), (), ["ann.json", "does not exist"], id="ann-missing"),
    pytest.param(None, lambda r: ((r / "ann.json").unlink(), (r / "ann.json").mkdir()), (),
                 ["ann.json", "is a folder"], id="ann-folder"),
    pytest.param(None, lambda r: (r / "ann.json").write_text('{"images": [1,'), (), ["ann.json", "not valid JSON"],
                 id="ann-not-json"),
    pytest.param(None, lambda r: (r / "ann.json").write_bytes(b"\xff\xfe\x00\x89\x00"), (),
                 ["ann.json", "cannot be read"], id="ann-binary"),
    pytest.param(None, lambda r: (r / "ann.json").write_text("[1, 2]"), (), ["ann.json", "JSON object"],
                 id="ann-list"),
    pytest.param(lambda d: d.pop("images"), None, (), ["ann.json", "no 'images' list"], id="no-images-key"),
    pytest.param(lambda d: d["images"][1].update(id="2"), None, (), ["ann.json", "id '2'", "not an integer"],
                 id="image-id-string"),
    pytest.param(lambda d: d["images"][0].update(height=0), None, (), ["image id 1", "height and width"],
                 id="image-height-0"),
    pytest.param(_ann(0, bbox=[-30, -30, 10, 10]), None, (), ["annotation id 10", "zero-area box", "-30"],
                 id="bbox-negative"),
    pytest.param(_ann(1, bbox=[30, 10, -20, 30]), None, (), ["annotation id 11", "zero-area box"],
                 id="bbox-negative-width"),
    pytest.param(_ann(0, bbox=[5, float("nan"), 20, 20]), None, (), ["annotation id 10", "finite", "nan"],
                 id="bbox-nan"),
    pytest.param(_ann(1, bbox=[30, 10, 20]), None, (), ["annotation id 11", "bbox", "[30, 10, 20]"],
                 id="bbox-length-3"),
    pytest.param(_ann(0, bbox=[True, 5, 20, 20]), None, (), ["annotation id 10", "bbox"], id="bbox-bool"),
    pytest.param(_ann(1, segmentation="30 10 50 10"), None, (), ["annotation id 11", "segmentation of type str"],
                 id="segm-string"),
    pytest.param(_ann(1, segmentation=[[30, 10, 50, 10, 40]]), None, (), ["annotation id 11", "invalid polygon"],
                 id="segm-odd-polygon"),
    pytest.param(_ann(0, segmentation={"size": [48, 64], "counts": "!!not~rle"}), None, (),
                 ["annotation id 10", "compressed RLE", "malformed"], id="segm-rle-garbage"),
    # the RLE of a 47x64 mask given as one of the 48x64 image
    pytest.param(_ann(0, segmentation={"size": [48, 64], "counts": mask_utils.encode(
                     np.ones((47, 64), np.uint8, order="F"))["counts"].decode()}), None, (),
                 ["annotation id 10", "compressed RLE", "3008 pixels", "3072"], id="segm-rle-short"),
    pytest.param(_ann(0, segmentation={"size": [48, 64], "counts": [100, "x"]}), None, (),
                 ["annotation id 10", "uncompressed RLE"], id="segm-rle-counts-str"),
    pytest.param(_ann(0, segmentation={"size": [64, 48], "counts": [3072]}), None, (),
                 ["annotation id 10", "[64, 48]", "[48, 64]"], id="segm-rle-size"),
    pytest.param(_ann(1, category_id=77), None, (), ["annotation id 11", "category id 77"], id="category-unknown"),
    pytest.param(_ann(0, image_id=5), None, (), ["annotation id 10", "image id 5"], id="image-unknown"),
    pytest.param(lambda d: d["annotations"][1].pop("id"), None, (), ["annotation #1", "no 'id'"], id="ann-no-id"),
    pytest.param(_ann(1, id=10), None, (), ["annotation id 10", "twice"], id="ann-id-repeated"),
    pytest.param(lambda d: d["annotations"][0].pop("area"), None, (), ["annotation id 10", "'area'"],
                 id="area-missing"),
    pytest.param(_ann(1, iscrowd="yes"), None, (), ["annotation id 11", "iscrowd 'yes'"], id="iscrowd-string"),
    # "skip" drops bad annotations but not these mistakes of the whole file
    pytest.param(_ann(1, category_id=77), None, ("data.invalid_annotations=skip",), ["annotation id 11", "77"],
                 id="skip-keeps-unknown-category"),
    pytest.param(lambda d: d.update(categories=[]), None, (), ["ann.json", "no categories"], id="no-categories"),
    pytest.param(lambda d: d.update(images=[], annotations=[]), None, (), ["ann.json", "lists no images"],
                 id="empty-dataset"),
    pytest.param(None, lambda r: (r / "img" / "b.png").unlink(), (), ["b.png", "image id 2", "missing"],
                 id="image-missing"),
    pytest.param(None, lambda r: shutil.rmtree(r / "img"), (), ["image folder", "img", "does not exist"],
                 id="image-folder-missing"),
    # read when a batch is loaded: in this process, then by a DataLoader worker
    pytest.param(None, _write_image("a.png", b"GIF89a but not really"), (), ["a.png", "image id 1", "cannot be read"],
                 id="image-not-an-image"),
    pytest.param(None, _write_image("a.png", lambda b: b[: len(b) // 3]), ("data.num_workers=1",),
                 ["a.png", "image id 1", "truncated"], id="image-truncated-worker"),
    pytest.param(None, _write_image("a.png", lambda b: b"x"), ("data.num_workers=1",),
                 ["a.png", "image id 1", "cannot be read"], id="image-garbage-worker"),
    pytest.param(None, lambda r: Image.new("RGB", (10, 12)).save(r / "img" / "a.png"), (),
                 ["a.png", "image id 1", "12x10", "48x64"], id="image-wrong-size"),
]


@pytest.mark.parametrize("edit, prep, extra, words", DATA_CASES)
def test_train_on_bad_data(tmp_path, capsys, edit, prep, extra, words):
    ann, img = _dataset(tmp_path, edit)
    if prep is not None:
        prep(tmp_path)
    code, line = _run(train_cli.main, _train_argv(tmp_path, ann, img, *extra), capsys)
    assert code == 1, line
    _assert_names(line, words)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


# --------------------------------------------------------------------------- train: usage and config


def _bad_yaml(text):
    return lambda root: ["--config", str(_write(root / "bad.yaml", text))]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
ROOT = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                          reason="needs folder permissions that bind (root writes anywhere)")


USAGE_CASES = [
    # (argv, or a function of the folder giving it; words the error line must hold)
    pytest.param(["--set", "solver.bse_lr=0.1"], ["unknown config key", "solver.bse_lr"], id="set-unknown-key"),
    pytest.param(["--set", "solver.base_lr=fast"], ["solver.base_lr", "number", "'fast'"], id="set-bad-float"),
    pytest.param(["--set", "solver.max_iter=1.5"], ["solver.max_iter", "integer"], id="set-bad-int"),
    pytest.param(["--set", "model.backbone=resnet7"], ["model.backbone", "resnet7"], id="set-bad-choice"),
    pytest.param(["--set", "solver.max_iter"], ["solver.max_iter", "key=value"], id="set-no-value"),
    pytest.param(lambda r: ["--config", str(r / "nope.yaml")], ["nope.yaml", "does not exist"], id="config-missing"),
    pytest.param(lambda r: ["--config", str(r)], ["is a folder"], id="config-folder"),
    pytest.param(_bad_yaml("model:\n  backbone: [resnet18\n  norm: gn\n"), ["bad.yaml", "not valid YAML", "line 3"],
                 id="config-bad-yaml"),
    pytest.param(_bad_yaml(b"\xff\xfe\x00model"), ["bad.yaml", "not UTF-8"], id="config-binary"),
    pytest.param(_bad_yaml("- model\n- solver\n"), ["bad.yaml", "mapping"], id="config-list"),
    pytest.param(_bad_yaml("solver:\n  max_itr: 3\n"), ["bad.yaml", "solver.max_itr"], id="config-unknown-key"),
    pytest.param(["--device", "tpu:0"], ["'tpu:0'", "not a device"], id="device-bogus"),
    pytest.param(["--device", "cuda"], ["'cuda'", "CUDA is not available", "--device cpu"],
                 id="device-cuda-without-cuda", marks=NO_CUDA),
    pytest.param(lambda r: ["--set", f"output_dir={_write(r / 'file', 'x')}"], ["output_dir", "file'", "is a file"],
                 id="output-dir-is-a-file"),
    pytest.param(lambda r: ["--set", f"output_dir={_write(r / 'file', 'x') / 'run'}"],
                 ["output_dir", "cannot be created", "is a file"], id="output-dir-under-a-file"),
    pytest.param(["--bogus"], ["unrecognized arguments: --bogus", "--help"], id="unknown-flag"),
    pytest.param(["--backend", "cuda"], ["--backend", "invalid choice"], id="bad-choice-flag"),
]


@pytest.mark.parametrize("argv, words", USAGE_CASES)
def test_train_usage_mistakes(tmp_path, capsys, argv, words):
    argv = argv(tmp_path) if callable(argv) else argv
    if "--config" not in argv:
        argv = ["--config", "smoke", *argv]
    argv += ["--set", f"data.synthetic.cache_dir={tmp_path / 'c'}"]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path / 'out'}")
    code, line = _run(train_cli.main, argv, capsys)
    assert code == 2, line
    _assert_names(line, words)
    # nothing was started: no synthetic data generated, no run folder with a checkpoint
    assert not (tmp_path / "c").exists() and not (tmp_path / "out" / "checkpoint.pth").exists()


def test_train_bad_model_files(tmp_path, capsys, data, files, checkpoint):
    ann, img = data
    code, line = _run(train_cli.main, _train_argv(tmp_path, ann, img) + ["--weights", str(files["missing"])], capsys)
    assert code == 1
    _assert_names(line, [files["missing"], "does not exist"])
    # --resume reads output_dir/checkpoint.pth: damaged, it is refused by name
    (tmp_path / "out").mkdir(exist_ok=True)
    for source, words in ((files["truncated"], ["truncated"]), (files["flipped"], ["corrupt", "CRC32"]),
                          (checkpoint, ["has no optimizer", "--weights"])):  # a model alone, as model_final.pth
        (tmp_path / "out" / "checkpoint.pth").write_bytes(source.read_bytes())
        code, line = _run(train_cli.main, _train_argv(tmp_path, ann, img) + ["--resume"], capsys)
        assert code == 1
        _assert_names(line, [tmp_path / "out" / "checkpoint.pth", *words])


def test_os_errors_name_the_file(tmp_path, capsys, data, monkeypatch):
    """An OSError the commands do not foresee (here a full disk) is one line naming its file, status 1."""
    import fastmask.config as config_mod

    def full_disk(cfg, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(config_mod, "save_config", full_disk)
    code, line = _run(train_cli.main, _train_argv(tmp_path, *data), capsys)
    assert code == 1
    _assert_names(line, [os.strerror(errno.ENOSPC), tmp_path / "out" / "config.yaml"])


# --------------------------------------------------------------------------- evaluate and predict


MODEL_FILE_CASES = [
    # (file, words after its path)
    pytest.param("missing", ["does not exist"], id="missing"),
    pytest.param("folder", ["is a folder"], id="folder"),
    pytest.param("truncated", ["cannot be read", "truncated"], id="truncated"),
    pytest.param("empty", ["cannot be read"], id="empty"),
    pytest.param("random", ["cannot be read"], id="random-bytes"),
    pytest.param("text", ["cannot be read"], id="text-file"),
    pytest.param("zip", ["cannot be read"], id="foreign-zip"),
    pytest.param("pickled", ["objects other than tensors", "Linear"], id="pickled-module"),
    pytest.param("tensor", ["neither a fastmask training checkpoint nor model weights"], id="a-tensor"),
    pytest.param("flipped", ["corrupt", "CRC32"], id="flipped-byte"),
]


@pytest.mark.parametrize("flag", ["--checkpoint", "--weights"])
@pytest.mark.parametrize("name, words", MODEL_FILE_CASES)
def test_evaluate_bad_model_files(tmp_path, capsys, files, flag, name, words):
    code, line = _run(evaluate_cli.main, [flag, str(files[name]), "--out", str(tmp_path / "e.json")], capsys)
    assert code == 1, line
    _assert_names(line, [repr(str(files[name])), *words])
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("name, words", [c for c in MODEL_FILE_CASES if c.id in ("truncated", "flipped-byte")])
def test_predict_bad_model_files(tmp_path, capsys, data, files, name, words):
    code, line = _run(predict_cli.main, [str(data[1] / "a.png"), "--checkpoint", str(files[name]),
                                         "--out", str(tmp_path / "p")], capsys)
    assert code == 1
    _assert_names(line, [repr(str(files[name])), *words])


def _break_val(edit):
    """--set overrides that point the validation split at a copy of the data set changed by ``edit``."""
    def make(root):
        ann, img = _dataset(root / "val", edit)
        return ["--set", f"data.val.annotations={ann}", f"data.val.images={img}"]
    return make


EVALUATE_CASES = [
    # (extra argv, or a function of the folder giving it; exit status; words)
    pytest.param(_break_val(_ann(1, bbox=[1, 2, 3])), 1, ["annotation id 11", "bbox"], id="bad-annotation"),
    pytest.param(lambda r: ["--set", f"data.val.annotations={r / 'none.json'}", f"data.val.images={r}"], 1,
                 ["none.json", "does not exist"], id="annotations-missing"),
    pytest.param(["--set", "foo.bar=1"], 2, ["unknown config key", "'foo'"], id="set-unknown-key"),
    pytest.param(["--config", "nope"], 2, ["'nope'", "does not exist"], id="config-missing"),
    pytest.param(["--device", "cuda:0"], 2, ["'cuda:0'", "CUDA"], id="device-cuda", marks=NO_CUDA),
    pytest.param(lambda r: ["--out", str(r)], 2, ["--out", "is a folder"], id="out-is-a-folder"),
    pytest.param(lambda r: ["--out", str(_write(r / "f", "x") / "e.json")], 2, ["--out", "is a file"],
                 id="out-under-a-file"),
    pytest.param(["--evaluator", "mine"], 2, ["--evaluator", "invalid choice"], id="bad-evaluator"),
]


@pytest.mark.parametrize("extra, status, words", EVALUATE_CASES)
def test_evaluate_bad_input(tmp_path, capsys, checkpoint, extra, status, words):
    extra = extra(tmp_path) if callable(extra) else extra
    code, line = _run(evaluate_cli.main, ["--checkpoint", str(checkpoint), *extra], capsys)
    assert code == status, line
    _assert_names(line, words)


def test_evaluate_image_unreadable_in_a_worker(tmp_path, capsys, checkpoint):
    ann, img = _dataset(tmp_path)
    (img / "b.png").write_bytes((img / "b.png").read_bytes()[:100])
    code, line = _run(evaluate_cli.main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e.json"), "--set",
                                          f"data.val.annotations={ann}", f"data.val.images={img}",
                                          "data.num_workers=1"], capsys)
    assert code == 1
    _assert_names(line, [img / "b.png", "image id 2", "cannot be read"])


PREDICT_CASES = [
    # (a function of (folder, image) giving the argv before --checkpoint; exit status; words, where
    # {root} stands for the folder)
    pytest.param(lambda r, a: [str(r / "nope.jpg")], 1, ["nope.jpg", "does not exist"], id="image-missing"),
    pytest.param(lambda r, a: [str(a), str(r)], 1, ["'{root}'", "is a folder"], id="image-is-a-folder"),
    pytest.param(lambda r, a: [str(_write(r / "x.png", "text"))], 1, ["x.png", "cannot be read"], id="not-an-image"),
    pytest.param(lambda r, a: [str(_write(r / "t.png", a.read_bytes()[:90]))], 1, ["t.png", "truncated"],
                 id="image-truncated"),
    pytest.param(lambda r, a: [str(a), "--out", str(_write(r / "f", "x"))], 2, ["--out", "is a file"],
                 id="out-is-a-file"),
    pytest.param(lambda r, a: [str(a), "--out", str(_write(r / "f", "x") / "sub")], 2,
                 ["--out", "cannot be created"], id="out-under-a-file"),
    pytest.param(lambda r, a: [str(a), "--out", str(_read_only(r) / "sub")], 2, ["--out", "cannot be written"],
                 id="out-read-only", marks=ROOT),
    pytest.param(lambda r, a: [str(a), "--score-thresh", "1.5"], 2, ["--score-thresh", "[0, 1]"], id="bad-thresh"),
    pytest.param(lambda r, a: [str(a), "--score-thresh", "high"], 2, ["--score-thresh", "'high'"],
                 id="thresh-not-a-number"),
    pytest.param(lambda r, a: [str(a), "--device", "cuda"], 2, ["'cuda'", "CUDA is not available"], id="device-cuda",
                 marks=NO_CUDA),
]


@pytest.mark.parametrize("make_argv, status, words", PREDICT_CASES)
def test_predict_bad_input(tmp_path, capsys, data, checkpoint, make_argv, status, words):
    argv = make_argv(tmp_path, data[1] / "a.png")
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "pred")]
    code, line = _run(predict_cli.main, [*argv, "--checkpoint", str(checkpoint)], capsys)
    assert code == status, line
    _assert_names(line, [w.format(root=tmp_path) for w in words])
    assert not (tmp_path / "pred" / "results.json").exists()


@pytest.mark.parametrize("main", [evaluate_cli.main, predict_cli.main], ids=["evaluate", "predict"])
def test_missing_model_flag_is_one_line(capsys, main):
    code, line = _run(main, ["img.png", "--out", "x"] if main is predict_cli.main else [], capsys)
    assert code == 2
    _assert_names(line, ["--checkpoint", "--weights", "required"])


# --------------------------------------------------------------------------- --debug and Ctrl-C


def test_debug_raises_the_error(tmp_path, files):
    """With --debug the expected errors propagate (a traceback) instead of becoming a line and an exit."""
    with pytest.raises(ConfigError, match="solver.bse_lr"):
        train_cli.main(["--config", "smoke", "--set", "solver.bse_lr=1", "--debug"])
    with pytest.raises(CheckpointError, match="CRC32"):
        evaluate_cli.main(["--checkpoint", str(files["flipped"]), "--debug"])
    with pytest.raises(DatasetError, match="nope.png"):
        predict_cli.main([str(tmp_path / "nope.png"), "--checkpoint", str(files["flipped"]), "--out", str(tmp_path),
                          "--debug"])


def test_interrupt_message_fits_the_command(tmp_path, capsys, checkpoint, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_cli, "load_for_inference", interrupt)
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main(["--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert info.value.code == 130 and err.strip() == "interrupted"  # no --resume hint: evaluate has none


def _subprocess(module, argv):
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120)


def test_end_to_end_error_and_debug(tmp_path):
    """As a user runs it: one line on stderr and status 1; with --debug, the full traceback of the same error."""
    ann, img = _dataset(tmp_path, _ann(1, category_id=77))
    argv = _train_argv(tmp_path, ann, img)
    plain = _subprocess("fastmask.train", argv)
    assert plain.returncode == 1, plain.stderr
    line = _error_line(plain.stderr)
    _assert_names(line, [ann, "annotation id 11", "category id 77"])
    debug = _subprocess("fastmask.train", [*argv, "--debug"])
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "DatasetError" in debug.stderr
    assert "annotation id 11" in debug.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- checkpoint integrity


def test_changed_byte_is_refused(tmp_path):
    """A byte changed in a tensor or in the pickled metadata: refused by name, not loaded as other values."""
    path = tmp_path / "ck.pth"
    weights = torch.arange(200_000, dtype=torch.float32)
    save_atomic({"format": FORMAT, "model": {"w": weights}, "iteration": 7,
                 "meta": {"class_names": ["__background__", "rectangle"]}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    good = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        pkl = next(name for name in z.namelist() if name.endswith("/data.pkl"))
        pickled = z.read(pkl)
    # the middle of the largest record (the tensor), then inside the class name "rectangle" in the pickle
    for record, at in ((None, 0.5), (pkl, (pickled.index(b"rectangle") + 3) / len(pickled))):
        path.write_bytes(good)
        name = _flip_byte(path, record, at)
        for reader in (load_checkpoint, read_model_file):
            with pytest.raises(CheckpointError) as info:
                reader(path)
            _assert_names(str(info.value), [repr(str(path)), "corrupt", name])


def test_state_dict_files_stay_loadable(tmp_path):
    """torchvision-style state_dict files: read when intact (also when written without CRCs), refused when changed."""
    state = {"conv.weight": torch.randn(64, 3, 7, 7)}
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    assert torch.equal(read_model_file(plain).state["conv.weight"], state["conv.weight"])
    _flip_byte(plain)
    with pytest.raises(CheckpointError, match="CRC32"):
        read_model_file(plain)
    unchecked = tmp_path / "no_crc.pth"
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, unchecked)
    finally:
        torch.serialization.set_crc32_options(before)
    assert read_model_file(unchecked).kind == "weights"


def test_checkpoints_always_carry_crcs(tmp_path):
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        save_atomic({"format": FORMAT, "model": {"w": torch.ones(1000)}}, tmp_path / "ck.pth")
        assert torch.serialization.get_crc32_options() is False  # the caller's setting is back
    finally:
        torch.serialization.set_crc32_options(before)
    with zipfile.ZipFile(tmp_path / "ck.pth") as z:
        assert all(i.CRC for i in z.infolist() if i.file_size)


# --------------------------------------------------------------------------- kill -9 during a save


# The child saves a first checkpoint, then a second whose writing stops after its first
# mebibyte (the marker file says so) until it is killed.
CHILD = r"""
import sys, time, torch
from pathlib import Path
from fastmask.engine import checkpoint as ck

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
ck.save_atomic({"format": ck.FORMAT, "model": {"w": torch.full((1000,), 1.0)}, "iteration": 1}, path)
real_save = torch.save

class Stalling:
    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        n = self.f.write(data)
        self.written += n
        if self.written >= 1 << 20:
            self.f.flush()
            marker.write_text(str(self.written))
            time.sleep(300)
        return n

    def flush(self):
        self.f.flush()

torch.save = lambda obj, f, **kw: real_save(obj, Stalling(f), **kw)
big = {f"w{i}": torch.randn(1 << 18) for i in range(16)}  # 16 MiB
ck.save_atomic({"format": ck.FORMAT, "model": big, "iteration": 2}, path)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "checkpoint.pth", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the child ended before the second save stalled"
            assert time.monotonic() < deadline, "the child did not start the second save"
            time.sleep(0.05)
        temps = list(tmp_path.glob("checkpoint.pth.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size >= 1 << 20  # mid-write: part of the new file is there
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["model"]["w"], torch.full((1000,), 1.0))
    assert temps[0].exists()  # the killed save's leftover...
    save_atomic({"format": FORMAT, "model": {"w": torch.zeros(3)}, "iteration": 3}, path)
    assert not temps[0].exists()  # ...is removed by the next save of the same name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "writing"]
    assert load_checkpoint(path)["iteration"] == 3


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_cleanup_keeps_a_live_writers_file(tmp_path):
    import fcntl

    path = tmp_path / "ck.pth"
    dead, live, other = (tmp_path / "ck.pth.dead.tmp", tmp_path / "ck.pth.live.tmp", tmp_path / "other.pth.x.tmp")
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as a save in progress holds it
        assert remove_stale_temporaries(path) == [str(dead)]
        save_atomic({"format": FORMAT, "model": {}}, path)
        assert live.exists() and other.exists() and not dead.exists()
    assert remove_stale_temporaries(path) == [str(live)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth", "other.pth.x.tmp"]
