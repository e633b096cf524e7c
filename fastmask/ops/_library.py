"""fastmask's ops in PyTorch's dispatcher: the ``fastmask`` namespace of ``torch.ops``.

Each public op validates its arguments, resolves the backend and calls one op registered
here, so that ``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` and ``torch.export``
see a single op with an exact fake (meta) implementation. The ops are registered with the
low-level ``torch.library.Library`` API, one kernel for every device
(``CompositeExplicitAutograd``): a call then costs about 5-8 us of dispatch on a CPU core,
where ``torch.library.custom_op`` measured 25-50 us (its per-call wrappers: autograd
redispatch, a dynamo guard, an aliasing check). Ops with gradients (RoI Align) add
``torch.library.register_autograd``; the others are not differentiable.

The ops are not autocast-aware: they run in their inputs' dtypes. Under ``torch.autocast`` a
kernel for the autocast keys turns autocast off for the op's body, so that the reference
implementations' own matrix products (mask paste, RoI Align) do not drop to fp16/bf16.
"""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "fastmask"
_LIB = torch.library.Library(NAMESPACE, "DEF")
# name -> the Python function implementing the op (what the dispatcher calls; the dispatch
# counter in benchmarks/ enters it to count the ops inside).
IMPLS: dict[str, Callable] = {}


def register(schema: str, fake: Callable) -> Callable:
    """Decorator: define ``fastmask::<schema>`` with the decorated function as its kernel on
    every device and ``fake`` as its fake implementation. Returns the function unchanged."""
    name = schema.split("(", 1)[0]

    def wrap(fn: Callable) -> Callable:
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        for key, device_type in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
            _LIB.impl(name, _without_autocast(name, device_type), key)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
        IMPLS[name] = fn
        return fn

    return wrap


def _without_autocast(name: str, device_type: str) -> Callable:
    """The op's kernel under autocast: the same op, called again with autocast off."""

    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return getattr(torch.ops.fastmask, name)(*args, **kwargs)

    return kernel
