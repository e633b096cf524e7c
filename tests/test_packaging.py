"""What `pip install .` puts on a machine: fastmask with its kernels, benchmarks and configs inside
the package, and no top-level ``kernels`` (PyPI has a widely used package of that name)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import os, sys, torch
import fastmask, fastmask.ops as ops
import fastmask.kernels.nms, fastmask.benchmarks.run
from fastmask.engine.cli import resolve_config_path
site = sys.argv[1]
assert fastmask.__file__.startswith(site), fastmask.__file__
assert fastmask.kernels.nms.__file__.startswith(site), fastmask.kernels.nms.__file__
assert str(resolve_config_path("synthetic")).startswith(site)
try:
    import kernels
except ImportError:
    pass
else:
    raise AssertionError("a top-level 'kernels' is importable: " + str(kernels.__file__))
boxes = torch.tensor([[0, 0, 4, 4], [1, 1, 5, 5], [10, 10, 12, 12.0]])
keep = ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.1, backend="triton")  # the kernel, interpreted
assert keep.tolist() == [0, 2], keep
print("ok")
"""


def _can_build_here() -> bool:
    """Whether this environment builds a wheel offline: setuptools >= 70.1 (which has
    bdist_wheel built in), or an older one beside the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _can_build_here(), reason="builds without build isolation (no network), which needs "
                                                  "setuptools >= 70.1, or setuptools and wheel, installed")
def test_installed_package_has_no_top_level_kernels(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-compile", "--target", str(site), str(ROOT)], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (site / "fastmask" / "kernels" / "roi_align.py").is_file()
    assert (site / "fastmask" / "configs" / "synthetic.yaml").is_file()
    assert not (site / "kernels").exists()
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_markdown_files_cited_exist():
    """Every ``*.md`` path the repository's text cites exists in it (relative to the root or
    to the citing file), so no file points to a document the repository does not contain."""
    root = ROOT
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    outputs = {"bench.md"}  # written by the benchmark runner, not part of the repository
    cited = re.compile(r"(?<![\w./:-])((?:[\w.-]+/)*[\w-]+\.md)\b")
    missing = []
    for name in listed.stdout.split():
        path = root / name
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".yaml", ".txt") or not path.is_file():
            continue
        for ref in cited.findall(path.read_text(errors="ignore")):
            if ref not in outputs and not (root / ref).exists() and not (path.parent / ref).exists():
                missing.append(f"{name} cites {ref}")
    assert not missing, missing
    assert (root / "docs/architecture.md").is_file()
