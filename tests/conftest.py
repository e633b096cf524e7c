"""Test session set-up.

Triton reads TRITON_INTERPRET when it is first imported (torchvision imports it too), so
it is set here, before any test module imports either: without a GPU every Triton kernel
runs on the CPU through Triton's interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # The interpreter tests would all fail with the same error: say it once, with the fix.
    if os.environ.get("TRITON_INTERPRET") == "1":
        from fastmask.ops._backend import interpreter_blocker

        if (reason := interpreter_blocker()) is not None:
            raise pytest.UsageError(f"the Triton kernel tests run in Triton's interpreter, but {reason}")
