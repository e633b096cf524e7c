"""The static-shape inference path: padded outputs, no host sync (counted), torch.export,
torch.compile(fullgraph=True), CUDA graph capture, and the channels-last and bf16 settings.

On the CPU the model is tiny (ResNet-18, ~100-pixel images, few proposals) so that the Triton
backend can run in Triton's interpreter; the CUDA tests run the R50-FPN at a real size.
"""

import warnings

import pytest
import torch
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, requires_cuda
from test_model_common import make_image, randomize_

import fastmask
from benchmarks.dispatch_count import count
from fastmask.inference import StaticDetector, capture, export, trim
from fastmask.models import build_mask_rcnn

ATOL, RTOL = TOL[torch.float32]
# Light heads (not torchvision's widths) keep the interpreter and bf16 runs short.
TINY_KW = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
               box_detections_per_img=10, box_score_thresh=0.0, fpn_channels=32, box_head_dim=64,
               mask_head_channels=(32, 32))
KEYS = ("boxes", "labels", "scores", "masks", "counts", "truncated")
BACKENDS = ["torch"] + (["triton"] if "cpu" in TRITON_DEVICES else [])


def _model(backend="torch", num_classes=4, **kw):
    torch.manual_seed(0)
    model = build_mask_rcnn(num_classes, backbone="resnet18", backend=backend, **dict(TINY_KW, **kw))
    randomize_(model, torch.Generator().manual_seed(1))
    return model.eval()


def _images(sizes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [make_image(h, w, g) for h, w in sizes]


def _assert_same(got: dict, want: dict, what: str, exact: bool = True):
    assert set(got) == set(want), what
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, f"{what}: {k}"
        if exact or not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), f"{what}: {k}"
        else:
            assert_close_verbose(got[k], want[k], ATOL, RTOL, f"{what}: {k}")


def test_padded_outputs_trim_to_model_outputs():
    """forward_padded's outputs, trimmed, are model(images)'s; the padding is zeros; masks fill
    each image's own size of the shared canvas; a batch tensor equals the list."""
    model = _model(box_detections_per_img=100)
    images = _images([(96, 120), (80, 100)])
    with torch.no_grad():
        padded = model.forward_padded(images)
        eager = model(images)
    assert set(padded) == set(KEYS)
    b, d = 2, 100
    assert padded["boxes"].shape == (b, d, 4) and padded["masks"].shape == (b, d, 1, 96, 120)
    assert padded["labels"].dtype == torch.int64 and padded["counts"].dtype == torch.int64
    counts = padded["counts"].tolist()
    assert counts == [len(e["boxes"]) for e in eager] and 0 < min(counts) and max(counts) < d  # padding to check
    for i, (e, r) in enumerate(zip(eager, trim(padded, [(96, 120), (80, 100)]))):
        for k in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(r[k], e[k]), f"{k} of image {i}"
        c = counts[i]
        for k in ("boxes", "labels", "scores", "masks"):
            assert not padded[k][i, c:].any(), f"padding rows of {k}, image {i}"
    assert not padded["masks"][1, :, :, 80:].any() and not padded["masks"][1, :, :, :, 100:].any()
    assert not padded["truncated"].any()

    same = _images([(96, 120), (96, 120)], seed=5)
    with torch.no_grad():
        _assert_same(model.forward_padded(torch.stack(same)), model.forward_padded(same), "batch tensor vs list")


def test_forward_padded_refuses_training_mode_and_bad_batches():
    model = _model().train()
    with pytest.raises(RuntimeError, match="eval"):
        model.forward_padded(_images([(96, 120)]))
    model.eval()
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        model.forward_padded(torch.rand(2, 4, 96, 120))


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS)
def test_static_path_has_no_sync(backend):
    """Counted on the CPU: the static path issues no op that reads the device on the host or
    makes a data-dependent shape (``item``, ``nonzero``, boolean-mask indexing, ``tolist``...),
    and after a warm-up no table built from host values per call (``lift_fresh``: a host-to-
    device copy on a GPU, which a CUDA graph could not replay). The Triton backend is counted
    inside fastmask's ops too (the kernels' host code is what runs on a GPU); the reference
    backend, whose NMS resolves tiles on the host by design, around them."""
    model = _model(backend)
    images = _images([(96, 120)])
    with torch.no_grad():
        c = count(model.forward_padded, images, enter_ops=backend == "triton")
        eager = count(model, images, enter_ops=False, warmup=False)
    assert c.syncs == [], c.syncs
    assert "aten.lift_fresh.default" not in c.aten, "a per-call host table in the static path"
    if backend == "triton":
        assert len(c.triton) >= 9, c.triton  # proposals, NMS x2, RoI Align x2, decode, paste: the ops ran
    # model(images) adds exactly one read, the counts at the end.
    assert eager.syncs == ["Tensor.tolist"], eager.syncs


@pytest.mark.model
@pytest.mark.parametrize("backend,settings", [(b, {}) for b in BACKENDS]
                         + [("torch", dict(channels_last=True, autocast_dtype=torch.bfloat16))])
def test_export_matches_eager(backend, settings):
    model = _model(backend, **settings)
    images = torch.stack(_images([(96, 120), (96, 120)]))
    program = export(model, images)  # the first call: the caches are filled while tracing
    # Every graph, the autocast region's own one included (export wraps it in a sub-graph).
    targets = [n.target for g in program.graph_module.modules() if isinstance(g, torch.fx.GraphModule)
               for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.fastmask.rpn_proposals.default in targets and torch.ops.fastmask.paste_masks.default in targets
    with torch.no_grad():
        want = model.forward_padded(images)
        got = program.module()(images)
    _assert_same(dict(got), want, "exported program")


@pytest.mark.model
def test_compile_fullgraph_matches_eager():
    model = _model()
    images = torch.stack(_images([(96, 120)]))
    torch._dynamo.reset()
    compiled = torch.compile(StaticDetector(model), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(images)
        want = model.forward_padded(images)
    _assert_same(got, want, "compiled", exact=False)


def test_capture_refuses_cpu_and_bad_arguments():
    model = _model()
    with pytest.raises(RuntimeError, match="CUDA device"):
        capture(model, 1, (96, 120))
    with pytest.raises(RuntimeError, match="eval"):
        capture(model.train(), 1, (96, 120))
    with pytest.raises(TypeError, match="MaskRCNN"):
        capture(torch.nn.Linear(2, 2), 1, (96, 120))
    assert fastmask.inference.capture is capture


def test_channels_last_setting():
    """channels_last=True stores the convolutions' weights NHWC, keeps the state dict, and
    gives the same detections within the fp32 tolerance (other convolution kernels)."""
    model = _model()
    images = _images([(96, 120), (80, 100)])
    with torch.no_grad():
        want = model(images)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.channels_last = True
        conv = model.backbone.body.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        got = model(images)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for i, (e, r) in enumerate(zip(want, got)):
        assert torch.equal(r["labels"], e["labels"]), f"labels of image {i}"
        for k in ("boxes", "scores", "masks"):
            assert_close_verbose(r[k], e[k], ATOL, RTOL, f"channels-last {k} of image {i}")
    model.channels_last = False
    assert model.backbone.body.conv1.weight.is_contiguous()
    with pytest.raises(TypeError):
        model.channels_last = 1


def test_bf16_autocast_setting():
    """autocast_dtype=torch.bfloat16 runs the backbone and heads under bf16 autocast (exactly
    what ``torch.autocast`` around the call gives) and returns fp32 boxes, scores and masks.

    Against fp32 the stated tolerance is loose: bf16 keeps 8 bits of mantissa, and a randomly
    initialised model's large box deltas go through ``exp``, so its boxes move by up to ~30% of
    their IoU (seen: best-match IoUs 0.70-0.99). The bound checked is that each of the five
    best fp32 detections is found again with its label and IoU >= 0.5."""
    model = _model(num_classes=3, box_detections_per_img=20)
    images = _images([(96, 120)])
    with torch.no_grad():
        want = model(images)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            manual = model(images)[0]
        model.autocast_dtype = torch.bfloat16
        got = model(images)[0]
    for k in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(got[k], manual[k]), k
    assert got["boxes"].dtype == torch.float32 and got["masks"].dtype == torch.float32
    assert not torch.equal(got["scores"], want["scores"])  # it did run in bf16
    top = want["boxes"][:5]
    iou = fastmask.ops.box_iou(top, got["boxes"])
    match = (iou >= 0.5) & (want["labels"][:5, None] == got["labels"][None, :])
    assert match.any(dim=1).all(), iou.max(dim=1).values
    with pytest.raises(ValueError, match="autocast_dtype"):
        model.autocast_dtype = torch.float64


# --------------------------------------------------------------------------- CUDA


def _cuda_model(**kw):
    torch.manual_seed(0)
    model = fastmask.maskrcnn_resnet50_fpn(num_classes=91, box_score_thresh=0.0, **kw)
    randomize_(model, torch.Generator().manual_seed(1))
    return model.cuda().eval()


@pytest.mark.model
@requires_cuda
def test_static_path_never_syncs_cuda():
    model = _cuda_model()
    images = [make_image(480, 640, torch.Generator().manual_seed(2)).cuda()]
    with torch.no_grad():
        model.forward_padded(images)  # warm-up: kernel compilation, cached tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.forward_padded(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs


@pytest.mark.model
@requires_cuda
@pytest.mark.parametrize("channels_last,autocast_dtype", [(False, None), (True, torch.bfloat16)])
def test_capture_replays_eager_cuda(channels_last, autocast_dtype):
    model = _cuda_model(channels_last=channels_last, autocast_dtype=autocast_dtype)
    g = torch.Generator().manual_seed(3)
    detector = capture(model, 2, (480, 640))
    for _ in range(2):  # new images each time: the graph reads its input buffer
        images = [make_image(480, 640, g).cuda() for _ in range(2)]
        got = detector(images, copy=True)
        with torch.no_grad():
            want = model.forward_padded(images)
        _assert_same(got, want, "graph replay", exact=False)
    with pytest.raises(ValueError, match="captured for 2 images"):
        detector([images[0]])
    with pytest.raises(ValueError, match="captured for"):
        detector(torch.rand(2, 3, 480, 640, device="cuda", dtype=torch.float16))


def test_model_warns_when_the_candidate_bound_bites():
    """model(images) reads the truncation flags with the counts and warns when they are set."""
    model = _model(box_detections_per_img=50, box_candidates_per_img=8)
    with torch.no_grad(), pytest.warns(UserWarning, match="box_candidates_per_img"):
        out = model(_images([(96, 120)]))
    assert len(out[0]["boxes"]) <= 8


@pytest.mark.model
def test_export_onnx_with_custom_domain_nodes(tmp_path):
    """ONNX export of the static path: the checker accepts it, each fastmask op is one node of
    the ``fastmask`` domain with its tensor inputs, and the outputs have their static shapes."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = _model()
    images = torch.stack(_images([(96, 120)]))
    path = tmp_path / "static.onnx"
    fastmask.inference.export_onnx(model, images, str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert ("fastmask", 1) in [(o.domain, o.version) for o in proto.opset_import]
    custom = [n for n in proto.graph.node if n.domain == "fastmask"]
    assert sorted(n.op_type for n in custom) == ["DecodeBoxes", "MultiscaleRoiAlign", "MultiscaleRoiAlign",
                                                  "NmsKeepMask", "PasteMasks", "RpnProposals"]
    roi = next(n for n in custom if n.op_type == "MultiscaleRoiAlign")
    assert len(roi.input) == 1 + 4  # the RoIs, then the four feature maps (variadic, last)
    with torch.no_grad():
        want = model.forward_padded(images)
    out = {o.name: o.type.tensor_type for o in proto.graph.output}
    assert list(out) == ["boxes", "scores", "labels", "counts", "truncated", "masks"]
    for name, t in out.items():
        assert [d.dim_value for d in t.shape.dim] == list(want[name].shape), name
    assert out["labels"].elem_type == onnx.TensorProto.INT64 and out["masks"].elem_type == onnx.TensorProto.FLOAT
