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

# Hypothesis settings profiles of the property tests (tests/test_properties.py). Registered here,
# before any test module is imported, so that ``pytest --hypothesis-profile=NAME`` can choose one;
# each test sets its own number of examples (see that file).
# - "fastmask" (loaded by default, also in CI): derandomize=True, so every run draws the same
#   examples and a failure is reproduced by running the test again; no example database.
# - "fastmask-explore": random draws, for searching beyond the fixed examples; a failing example
#   is saved and replayed first on the next run.
# Both: no deadline (an example runs Triton kernels in the interpreter: 0.01 s to 1 s, and the
# first call of a kernel variant is slower still). Hypothesis keeps its files (the explore
# database, caches) under .pytest_cache/hypothesis, which git already ignores, instead of a
# .hypothesis/ folder in the working directory.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
    from hypothesis.configuration import set_hypothesis_home_dir
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # hypothesis is in the dev extra; without it only test_properties.py cannot run
    pass
else:
    _hyp_home = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                             "hypothesis")
    set_hypothesis_home_dir(_hyp_home)
    _common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.register_profile("fastmask", derandomize=True, database=None, **_common)
    _hyp_settings.register_profile("fastmask-explore", derandomize=False, **_common,
                                   database=DirectoryBasedExampleDatabase(os.path.join(_hyp_home, "examples")))
    _hyp_settings.load_profile("fastmask")


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
