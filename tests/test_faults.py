"""Faults: bad data given to training ends in one ``error:`` line naming the file and the id,
and exit status 1; checkpoints survive a kill mid-save and refuse to load when a byte of
them changed.

The command runs in this process (its ``main(argv)``) on the 2-image data set of test_cli;
one check kills a process while it writes a checkpoint.
"""

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

from fastmask import train as train_cli
from fastmask.engine.checkpoint import (FORMAT, CheckpointError, load_checkpoint, read_model_file,
                                        remove_stale_temporaries, save_atomic)
from test_cli import _dataset

# What may precede the error line on stderr: the trainer's log lines, notes and progress bars.
LOG_PREFIXES = ("[", "info:", "train:", "evaluate:")


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
