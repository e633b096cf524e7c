"""Training checkpoints: written atomically, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict:

- ``model``: the model's ``state_dict`` (torchvision's key names, no DDP prefix);
- ``optimizer``, ``scheduler``, ``scaler``: their ``state_dict``s (a resumed run restores the optimizer and
  scaler; its schedule is rebuilt from its own config at the saved iteration);
- ``rng``: one entry per rank with the Python, NumPy, torch CPU and CUDA generator states;
- ``iteration``: completed iterations; ``config``: the run's config as a dict;
- ``meta``: ``num_classes``, ``class_names``, ``label_to_cat_id`` and ``arch`` (the model
  settings that decide the tensor shapes), so evaluation and prediction need nothing else.

It is written to a temporary file in the same folder (``<name>.<random>.tmp``), flushed to
disk and renamed over the old one, so a crash, a kill or a full disk never leaves a
truncated checkpoint in its place. The writer holds an ``flock`` on its temporary file, so
the next save of the same name can tell the temporary files of killed saves (unlocked) from
one being written (locked), and removes the former.

Every record of the archive carries a CRC32 (written whatever
``torch.serialization.set_crc32_options`` says), and reading verifies them: ``torch.load``
does not, and would load a checkpoint with a changed byte in a tensor as different weights.

:func:`load_checkpoint` reads a checkpoint to resume from; :func:`read_model_file` reads any
file of model weights (a checkpoint, or a torchvision or fastmask ``state_dict``) and says
which it is, for ``--weights`` and ``--checkpoint`` of the commands.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; a temporary file in use there cannot be deleted anyway
    fcntl = None

FORMAT = "fastmask-checkpoint-1"
LAST = "checkpoint.pth"      # the latest checkpoint of a run, rewritten at every save
FINAL = "model_final.pth"    # the end of a finished run
# The tensor whose first dimension is a Mask R-CNN's class count (background included).
CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename.

    Temporary files of earlier saves of ``path`` that were killed mid-write are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(True)  # the CRCs are what reading verifies
            try:
                torch.save(obj, f)
            finally:
                torch.serialization.set_crc32_options(crc)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                # Renamed while still locked: a concurrent cleanup never sees it unlocked under its temporary name.
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed saves of ``path`` left; returns their names.

    A temporary file whose writer is alive is locked (``flock``) and kept.
    """
    path = Path(path)
    removed = []
    for tmp in glob.glob(glob.escape(str(path)) + ".*.tmp"):
        try:
            with open(tmp, "rb") as f:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(tmp)
            removed.append(tmp)
        except OSError:  # locked by a live writer, already gone, or (Windows) open elsewhere
            continue
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _damaged_record(path: str) -> str | None:
    """The first record of the zip archive at ``path`` whose CRC32 does not match, else None.

    Archives written without CRCs (all zero: ``torch.serialization.set_crc32_options(False)``)
    cannot be checked and pass.
    """
    name = None
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if not any(info.CRC for info in infos if info.file_size):
                return None
            for info in infos:
                name = info.filename
                with z.open(info) as f:  # ZipExtFile compares the CRC32 when it reaches the end
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error):
        return name or "its central directory"
    return None


def _not_a_file(noun: str, path: str) -> str | None:
    if os.path.isdir(path):
        return f"{noun} {path!r} is a folder, not a file"
    if not os.path.isfile(path):
        return f"{noun} {path!r} does not exist"
    return None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A fastmask checkpoint (on the CPU), or :class:`CheckpointError` saying why not."""
    path = str(path)
    if (problem := _not_a_file("checkpoint", path)) is not None:
        raise CheckpointError(problem)
    # torch.save writes a zip archive; a truncated or foreign file fails this check.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a PyTorch checkpoint file (truncated or corrupt)")
    if (record := _damaged_record(path)) is not None:
        raise CheckpointError(_corrupt("checkpoint", path, record))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("Weights only load failed.")[-1].strip().splitlines()
        raise CheckpointError(f"checkpoint {path!r} holds objects other than tensors and plain containers, so it "
                              f"is not a fastmask checkpoint{': ' + reason[0] if reason else ''}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read (truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path!r} is not a fastmask training checkpoint (no {FORMAT!r} format "
                              "tag); to start from other weights use --weights")
    return ckpt


@dataclass
class ModelFile:
    """A file of model weights, told apart by content.

    ``kind`` is ``"checkpoint"`` (a fastmask training checkpoint: ``ckpt`` holds all of it)
    or ``"weights"`` (bare weights: a torchvision or fastmask ``state_dict``, possibly
    under a ``model`` key of another trainer's file); ``state`` is the model's state dict
    with torchvision's key names in both cases.
    """

    path: str
    kind: str
    state: dict
    ckpt: dict | None = None

    @property
    def num_classes(self) -> int:
        """Classes the box predictor scores (background included), or CheckpointError."""
        w = self.state.get(CLS_SCORE)
        if w is None or w.dim() != 2:
            keys = sorted(self.state)
            raise CheckpointError(f"weights {self.path!r} are not a Mask R-CNN state dict: no {CLS_SCORE!r} among "
                                  f"its {len(keys)} tensors (e.g. {', '.join(keys[:3]) or 'none'})")
        return int(w.shape[0])


def read_model_file(path: str | os.PathLike, noun: str = "weights") -> ModelFile:
    """A fastmask checkpoint or bare model weights, or :class:`CheckpointError` naming the file.

    Unlike :func:`load_checkpoint` this accepts the pre-zip ``torch.save`` format too:
    torchvision's published Mask R-CNN weights were written in it. ``noun`` starts the
    error messages ("weights", "checkpoint"), after the flag the file was given to.
    """
    path = str(path)
    if (problem := _not_a_file(f"{noun} file", path)) is not None:
        raise CheckpointError(problem)
    # The pre-zip format (torchvision's published weights) has no checksums to verify.
    if zipfile.is_zipfile(path) and (record := _damaged_record(path)) is not None:
        raise CheckpointError(_corrupt(f"{noun} file", path, record))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            # A pickled object outside tensors and plain containers (torch.load refuses to run its
            # code): name its class, and say how a trusted file gives loadable weights. Other
            # refusals ("Unsupported operand") come from bytes that are no pickle at all.
            raise CheckpointError(
                f"{noun} file {path!r} holds objects other than tensors and plain containers ({found.group(1)}), "
                "which are not loaded for safety; if you trust the file, save its model's state_dict alone, e.g. "
                "torch.save(torch.load(FILE, weights_only=False)['model'], 'weights.pth')") from None
        raise CheckpointError(_unreadable(noun, path)) from None
    except Exception:  # torch.load raises many types for a foreign or truncated file
        raise CheckpointError(_unreadable(noun, path)) from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("model"), Mapping):
        return ModelFile(path, "checkpoint", dict(obj["model"]), obj)
    state = obj
    # Another trainer's checkpoint that keeps the model under "model" (with tensors beside it).
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{noun} file {path!r} is neither a fastmask training checkpoint nor model weights "
                              "(a state dict: name -> tensor, as torchvision's state_dict() and torch.save write)")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return ModelFile(path, "weights", state)


def _unreadable(noun: str, path: str) -> str:
    # torch.load's own reasons ("101", "EOFError", a miniz error) tell a user nothing more.
    why = "a damaged torch.save archive" if zipfile.is_zipfile(path) else \
        "not a file torch.save wrote, or it is truncated or corrupt"
    return f"{noun} file {path!r} cannot be read: it is {why}"


def _corrupt(noun: str, path: str, record: str) -> str:
    return f"{noun} {path!r} is corrupt: its record {record!r} does not match its CRC32 checksum"


def check_architecture(ckpt: dict, arch: dict, path: str) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's model settings differ from ``arch``."""
    saved = ckpt.get("meta", {}).get("arch", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {arch[k]!r}" for k in sorted(arch) if saved.get(k) != arch[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} was made for another architecture ({'; '.join(diffs)})")


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """Strict ``load_state_dict`` whose failure names the file and a few keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}")
        if shapes:
            parts.append("shapes differ for " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:4]))
        raise CheckpointError(f"checkpoint {path!r} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Every generator a training step may draw from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples where a round trip through a file may give lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
