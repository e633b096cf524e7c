"""Backend selection: names, the environment variable, and clear errors."""

import os
import subprocess
import sys

import pytest
import torch

from fastmask.ops import resolve_backend, roi_align
from fastmask.ops._backend import check_backend_name, interpreter_blocker_for


def test_names_and_environment(monkeypatch):
    x = torch.zeros(1)
    assert resolve_backend("torch", x, "op") == "torch"
    assert resolve_backend("auto", x, "op") == "torch"  # CPU tensors use the reference under auto
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    assert check_backend_name(None) == "torch"
    monkeypatch.setenv("FASTMASK_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTMASK_BACKEND"):
        resolve_backend(None, x, "op")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", x, "op")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="roi_align: backend='triton' was asked for but cannot run.*TRITON_INTERPRET"):
        roi_align(x, torch.zeros(1, 5), 2, backend="triton")


@pytest.mark.parametrize("triton_v,numpy_v,blocked", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                     ("3.7.0", "2.4.6", False), ("3.10.1", "3.0.0", False),
                                                     ("3.6.0+git1a2b", "2.10.0rc1", True), ("3.5", "3", True)])
def test_interpreter_blocker_names_the_fix(triton_v, numpy_v, blocked):
    reason = interpreter_blocker_for(triton_v, numpy_v)
    assert (reason is not None) == blocked
    if blocked:
        assert triton_v in reason and "numpy<2.4" in reason and "triton>=3.7" in reason


def test_interpreter_blocker_stops_the_triton_backend(monkeypatch):
    import fastmask.ops._backend as backend

    monkeypatch.setattr(backend, "interpreter_blocker", lambda: interpreter_blocker_for("3.6.0", "2.4.6"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="roi_align: backend='triton' was asked for but cannot run: Triton 3.6"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, backend="triton")
    assert roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, backend="auto").shape == (1, 1, 2, 2)


def test_torch_backend_never_imports_triton():
    """The library's import must not import Triton, and every op with backend='torch' must run
    where Triton cannot be imported at all, without touching fastmask's kernels. (Calling any
    registered custom op imports torch._dynamo, which itself imports triton when it can, so the
    ops are run with triton made unimportable.)"""
    code = """
import sys, torch
import fastmask.ops as ops
assert "triton" not in sys.modules, "importing fastmask.ops imported triton"
sys.modules["triton"] = None  # any 'import triton' now raises ImportError
x = torch.randn(2, 3, 16, 16)
ops.roi_align(x, torch.tensor([[0, 1.0, 1, 9, 9]]), 2, backend="torch")
ops.multiscale_roi_align([x, x[..., ::2, ::2]], [torch.tensor([[1.0, 1, 9, 9]]), torch.zeros(0, 4)], 2, [(16, 16)] * 2, backend="torch")
b = torch.tensor([[0, 0, 4, 4], [1, 1, 5, 5], [10, 10, 12, 12.0]])
s = torch.tensor([0.9, 0.8, 0.7])
ops.nms(b, s, 0.5, backend="torch")
ops.batched_nms(b, s, torch.tensor([0, 1, 0]), 0.5, backend="torch")
ops.decode_boxes(torch.zeros(3, 4), b, backend="torch")
ops.encode_boxes(b, b + 1, backend="torch")
ops.paste_masks(torch.rand(3, 1, 7, 7), b, (16, 16), backend="torch")
assert not [k for k in sys.modules if k.startswith("fastmask.kernels")], "backend='torch' imported the kernels"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMASK_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
