"""Faults in checkpoints: a kill mid-save leaves the previous checkpoint loadable, and a
checkpoint with a changed byte is refused by name instead of loading as other weights.
"""

import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from fastmask.engine.checkpoint import (FORMAT, CheckpointError, load_checkpoint, read_model_file,
                                        remove_stale_temporaries, save_atomic)


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
