"""fastmask's registered ops (``torch.ops.fastmask.*``): opcheck, no host sync, compile, export.

Every public op calls one ``fastmask::`` custom op with the backend already resolved. Here:
``torch.library.opcheck`` on each with both backends (Triton through the interpreter), small
but non-trivial inputs; the dispatch counter proves that no op reads a device value or makes a
data-dependent shape (except the kept indices of ``nms``, once, at the end) and holds each
op's launch count to its recorded budget; ``torch.compile(fullgraph=True)`` and
``torch.export`` of the static-shape ops.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import dispatch_count
from fastmask import ops
from fastmask.ops._backend import interpreter_blocker, interpreter_enabled

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_enabled() and not torch.cuda.is_available(), reason="needs Triton's interpreter or a GPU"))]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _boxes(n, size, g):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _op_cases(backend):
    """(op overload, args) pairs: every registered op on small inputs."""
    g = _gen()
    feats = [torch.randn(2, 5, 32 // s, 40 // s, generator=g, dtype=torch.float64 if backend == "torch" else
                         torch.float32) for s in (4, 8)]
    boxes = _boxes(12, 28.0, g)
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), boxes], dim=1)
    scores = torch.rand(12, generator=g)
    cls = torch.randint(0, 3, (12,), generator=g)
    b3 = _boxes(2 * 40, 60.0, g).reshape(2, 40, 4)
    s3, c3 = torch.rand(2, 40, generator=g), torch.randint(0, 3, (2, 40), generator=g)
    valid = torch.rand(2, 40, generator=g) > 0.2
    codes = torch.randn(12, 8, generator=g) * 0.3
    masks = torch.rand(6, 7, 7, generator=g)
    fastmask = torch.ops.fastmask
    return {
        "roi_align": (fastmask.roi_align.default,
                      (feats[0].requires_grad_(), rois, [3, 3], 0.25, 2, True, False, backend)),
        "roi_align_nhwc": (fastmask.roi_align.default,
                           (feats[0].detach().to(memory_format=torch.channels_last).requires_grad_(), rois, [2, 3],
                            0.25, -1, False, False, backend)),
        "multiscale_roi_align": (fastmask.multiscale_roi_align.default,
                                 ([f.detach().requires_grad_() for f in feats], rois, [3, 3], [0.25, 0.125], 2,
                                  32.0, 4, False, backend)),
        "roi_align_backward": (fastmask.roi_align_backward.default,
                               (torch.randn(12, 5, 3, 3, generator=g, dtype=feats[0].dtype), rois,
                                [*feats[0].shape, *feats[1].shape], [False, False], feats[0].dtype, [3, 3],
                                [0.25, 0.125], 2, False, 32.0, 4, backend == "triton", backend)),
        "nms": (fastmask.nms.default, (boxes, scores, 0.3, backend)),
        "batched_nms": (fastmask.batched_nms.default, (boxes, scores, cls, 0.3, backend)),
        "nms_keep_mask": (fastmask.nms_keep_mask.default, (b3, s3, 0.4, c3, valid, backend)),
        "decode_boxes": (fastmask.decode_boxes.default,
                         (codes, boxes, [10.0, 10.0, 5.0, 5.0], 4.1, None, [30.0, 33.0], backend)),
        "decode_boxes_rows": (fastmask.decode_boxes.default,
                              (codes, boxes, [1.0, 1.0, 1.0, 1.0], 4.1,
                               torch.tensor([[30.0, 33.0]]).expand(12, 2).contiguous(), None, backend)),
        "paste_masks": (fastmask.paste_masks.default, (masks, _boxes(6, 20.0, g), [24, 30], 1, None, backend)),
        "paste_masks_bool": (fastmask.paste_masks.default, (masks, _boxes(6, 20.0, g), [24, 30], 1, 0.5, backend)),
        "rpn_proposals": (fastmask.rpn_proposals.default, _rpn_args(backend)),
    }


RPN_IMAGE_SIZES = [(32, 30), (28, 32)]


def _rpn_geometry(device="cpu"):
    """A two-level anchor geometry of a padded 2 x 32 x 32 batch."""
    from fastmask.models.transform import ImageList

    gen = ops.AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    image_list = ImageList(torch.zeros(2, 3, 32, 32, device=device), RPN_IMAGE_SIZES)
    return gen.geometry(image_list, [torch.zeros(2, 1, 8, 8, device=device), torch.zeros(2, 1, 4, 4, device=device)])


def _rpn_inputs(geo):
    g = _gen(1)
    a = sum(geo.num_anchors_per_level)
    return torch.randn(2, a, generator=g), torch.randn(2, a, 4, generator=g) * 0.2


def _rpn_args(backend):
    geo = _rpn_geometry()
    return (*_rpn_inputs(geo), None, *geo.flat(), [v for hw in RPN_IMAGE_SIZES for v in hw],
            geo.num_anchors_per_level, 50, 30, 0.6, 0.0, 1e-3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["roi_align", "roi_align_nhwc", "multiscale_roi_align", "roi_align_backward", "nms",
                                  "batched_nms", "nms_keep_mask", "decode_boxes", "decode_boxes_rows", "paste_masks",
                                  "paste_masks_bool", "rpn_proposals"])
def test_opcheck(name, backend):
    op, args = _op_cases(backend)[name]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- host work per call

# Most device launches (aten kernels + Triton) one call of each op may issue, Triton backend,
# at the sizes of ``benchmarks.dispatch_count.standard_cases`` (the counts are recorded in
# benchmarks/NOTES.md). A change that adds host work fails here.
LAUNCH_BUDGET = {
    "roi_align": 1, "multiscale_roi_align": 5, "nms (": 6, "batched_nms": 6, "nms_keep_mask": 4, "decode_boxes": 1,
    "rpn_proposals_padded": 18, "paste_masks": 1,
}
# Ops whose output has a data-dependent length: exactly one sync, at the end.
DATA_DEPENDENT = ("nms (", "batched_nms")


def _budget(name):
    return next(v for k, v in LAUNCH_BUDGET.items() if name.startswith(k))


@pytest.fixture(scope="module")
def triton_counts():
    if interpreter_blocker() is not None or not interpreter_enabled():
        pytest.skip("needs Triton's interpreter")
    return {name: dispatch_count.count(fn) for name, fn in dispatch_count.standard_cases("triton").items()}


def test_triton_ops_do_not_sync(triton_counts):
    for name, counter in triton_counts.items():
        expected = 1 if name.startswith(DATA_DEPENDENT) else 0
        assert len(counter.syncs) == expected, (name, counter.syncs)
        if expected:  # the one sync comes last: nothing launches after it (the kept indices' count)
            last = max(i for i, op in enumerate(counter.aten) if op in dispatch_count.SYNC_OPS)
            assert all(op in dispatch_count.NO_LAUNCH for op in counter.aten[last + 1:]), (name, counter.aten[last:])


def test_triton_ops_launch_budget(triton_counts):
    for name, counter in triton_counts.items():
        assert counter.launches <= _budget(name), (name, counter.launches, counter.ops, counter.triton)
        assert len(counter.triton) >= 1, name


def test_reference_ops_without_host_loops_do_not_sync():
    """The reference's readable NMS walks tiles on the host; the other ops do not sync."""
    for name, fn in dispatch_count.standard_cases("torch").items():
        if name.startswith(("nms", "batched_nms", "rpn_proposals_padded")):
            continue
        counter = dispatch_count.count(fn)
        assert counter.syncs == [] and counter.triton == [], (name, counter.syncs)


def test_counter_sees_syncs_and_launches():
    """The counter itself: it must catch a sync, a mask index and a Triton-free launch."""
    x = torch.arange(6.0)
    counter = dispatch_count.count(lambda: (x[x > 2], float(x.sum())), warmup=False)
    assert "aten.index.Tensor[bool mask]" in counter.syncs
    assert "aten._local_scalar_dense.default" in counter.syncs
    assert counter.launches >= 3 and counter.triton == []


def test_data_checks_follow_the_environment(monkeypatch):
    """FASTMASK_CHECKS=0 turns the CPU value checks off; =1 or unset keeps them on CPU."""
    boxes = torch.tensor([[0.0, 0.0, 1.0, float("nan")]])
    with pytest.raises(ValueError, match="non-finite"):
        ops.nms(boxes, torch.ones(1), 0.5, backend="torch")
    monkeypatch.setenv("FASTMASK_CHECKS", "1")
    with pytest.raises(ValueError, match="non-finite"):
        ops.nms(boxes, torch.ones(1), 0.5, backend="torch")
    monkeypatch.setenv("FASTMASK_CHECKS", "0")
    ops.nms(boxes, torch.ones(1), 0.5, backend="torch")  # no check, no error


# --------------------------------------------------------------------------- compile and export


def _static_cases(backend, device="cpu"):
    """name -> (public-op function, its tensor arguments on ``device``)."""
    g = _gen(3)
    x = torch.randn(1, 4, 16, 16, generator=g)
    boxes = _boxes(5, 14.0, g)
    rois = torch.cat([torch.zeros(5, 1), boxes], dim=1)
    kw = dict(backend=backend)
    x, boxes, rois = x.to(device), boxes.to(device), rois.to(device)
    return {
        "roi_align": (lambda a, r: ops.roi_align(a, r, 3, 0.5, 2, True, **kw), (x, rois)),
        "multiscale_roi_align": (lambda a, b: ops.multiscale_roi_align([a, a[:, :, ::2, ::2]], [b], 3, [(32, 32)], 2,
                                                                       **kw), (x, boxes)),
        "nms_keep_mask": (lambda b, s: ops.nms_keep_mask(b, s, 0.5, **kw),
                          (boxes, torch.rand(5, generator=g).to(device))),
        "decode_boxes": (lambda c, b: ops.decode_boxes(c, b, (1.0, 1.0, 1.0, 1.0), clip_to=(20, 20), **kw),
                         (torch.randn(5, 4, generator=g).to(device), boxes)),
        "paste_masks": (lambda m, b: ops.paste_masks(m, b, (20, 20), threshold=0.5, **kw),
                        (torch.rand(5, 1, 6, 6, generator=g).to(device), boxes)),
        "rpn_proposals_padded": _rpn_padded_case(backend, device),
    }


def _rpn_padded_case(backend, device):
    geo = _rpn_geometry(device)

    def fn(objectness, deltas):
        return ops.rpn_proposals_padded(objectness, deltas, geo, RPN_IMAGE_SIZES, pre_nms_top_n=50,
                                        post_nms_top_n=30, nms_thresh=0.6, backend=backend)
    return fn, tuple(t.to(device) for t in _rpn_inputs(geo))


STATIC_OPS = ["roi_align", "multiscale_roi_align", "nms_keep_mask", "decode_boxes", "paste_masks",
              "rpn_proposals_padded"]


@pytest.mark.parametrize("name", STATIC_OPS)
def test_compile_fullgraph_reference(name):
    """The public op under torch.compile(fullgraph=True) gives the eager result (CPU, reference)."""
    torch._dynamo.reset()
    fn, args = _static_cases("torch")[name]
    expected = fn(*args)
    got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    for e, o in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_roi_align_backward(backend):
    """One op through AOT autograd (the fake and the registered backward; no C++ compiler
    needed), backward included, on each backend (Triton through the interpreter)."""
    torch._dynamo.reset()
    fn, (x, rois) = _static_cases(backend)["roi_align"]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fn(x1, rois).square().sum().backward()
    torch.compile(lambda a, r: fn(a, r).square().sum(), fullgraph=True, backend="aot_eager")(x2, rois).backward()
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STATIC_OPS + ["nms", "batched_nms"])
def test_export(name, backend):
    """torch.export of a small module calling the op; the exported program gives the eager result."""
    if name in ("nms", "batched_nms"):
        g = _gen(4)
        boxes, scores, cls = _boxes(30, 40.0, g), torch.rand(30, generator=g), torch.randint(0, 3, (30,), generator=g)
        fn = ((lambda b, s: ops.nms(b, s, 0.5, backend=backend)) if name == "nms"
              else (lambda b, s, c: ops.batched_nms(b, s, c, 0.5, backend=backend)))
        args = (boxes, scores) if name == "nms" else (boxes, scores, cls)
    else:
        fn, args = _static_cases(backend)[name]

    class Module(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    program = torch.export.export(Module(), args)
    assert any(str(n.target).startswith("fastmask.") for n in program.graph.nodes)
    for e, o in zip(torch.utils._pytree.tree_leaves(fn(*args)),
                    torch.utils._pytree.tree_leaves(program.module()(*args))):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_cuda_ops_do_not_sync():
    """Each op's Triton path on CUDA under torch.cuda.set_sync_debug_mode("error") (after a
    warm-up call that fills the host-side caches); nms / batched_nms end in their one sync."""
    for name, fn in dispatch_count.standard_cases("triton", "cuda").items():
        fn()
        torch.cuda.synchronize()
        if name.startswith(DATA_DEPENDENT):
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["roi_align", "roi_align_nhwc", "multiscale_roi_align", "roi_align_backward", "nms",
                                  "batched_nms", "nms_keep_mask", "decode_boxes", "decode_boxes_rows", "paste_masks",
                                  "paste_masks_bool", "rpn_proposals"])
def test_opcheck_cuda(name):
    op, args = _op_cases("triton")[name]
    args = torch.utils._pytree.tree_map(
        lambda a: (a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a), args)
    torch.library.opcheck(op, args)


@pytest.mark.cuda
@pytest.mark.parametrize("name", STATIC_OPS)
def test_compile_fullgraph_cuda(name):
    """The public op through inductor on CUDA (the Triton kernels inside the registered op)."""
    torch._dynamo.reset()
    fn, args = _static_cases("triton", "cuda")[name]
    expected = fn(*args)
    got = torch.compile(fn, fullgraph=True)(*args)
    for e, o in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_rpn_proposals_padded_triton_matches_reference(backend):
    """The registered proposal op end to end (fused candidates, then the NMS kernels on the
    already sorted candidates, without a sort) against the reference."""
    fn_t, args = _static_cases(backend)["rpn_proposals_padded"]
    fn_r, _ = _static_cases("torch")["rpn_proposals_padded"]
    boxes_t, scores_t, counts_t = fn_t(*args)
    boxes_r, scores_r, counts_r = fn_r(*args)
    assert torch.equal(counts_t, counts_r) and counts_r.min() > 5
    for i, c in enumerate(counts_r.tolist()):
        torch.testing.assert_close(scores_t[i, :c], scores_r[i, :c], rtol=0, atol=0)
        torch.testing.assert_close(boxes_t[i, :c], boxes_r[i, :c], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_in_their_inputs_dtype_under_autocast(backend):
    """Under bf16 autocast the ops still compute in their inputs' dtype (the reference's own
    matrix products included): the results equal those outside autocast, bit for bit."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 28, 28, generator=g)
    boxes = torch.rand(6, 4, generator=g) * 40
    boxes[:, 2:] += boxes[:, :2] + 5
    feats = torch.randn(1, 8, 24, 24, generator=g)
    rois = torch.cat([torch.zeros(6, 1), boxes / 2], dim=1)
    calls = {
        "paste_masks": lambda: ops.paste_masks(masks, boxes, (64, 64), backend=backend),
        "roi_align": lambda: ops.roi_align(feats, rois, 7, 1.0, 2, aligned=True, backend=backend),
    }
    for name, call in calls.items():
        want = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), name
