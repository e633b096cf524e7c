"""backend="triton" and backend="torch" give the same model outputs and losses.

On the CPU the Triton kernels run in Triton's interpreter, so the model is tiny (ResNet-18,
one ~100-pixel image, few proposals); on a GPU the same comparison runs at a realistic size.
"""

import subprocess
import sys

import pytest
import torch
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, requires_cuda
from test_model_common import make_image, make_target, randomize_

from fastmask.models import build_mask_rcnn

ATOL, RTOL = TOL[torch.float32]

TINY_KW = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
               box_detections_per_img=10, box_score_thresh=0.0, rpn_pre_nms_top_n_train=100,
               rpn_post_nms_top_n_train=50, rpn_batch_size_per_image=32, box_batch_size_per_image=16)


def _model(backbone, num_classes, **kw):
    torch.manual_seed(0)
    model = build_mask_rcnn(num_classes, backbone=backbone, backend="torch", **kw)
    randomize_(model, torch.Generator().manual_seed(1))
    return model


def _compare_eval(model, images):
    with torch.no_grad():
        expected = model.set_backend("torch")(images)
        got = model.set_backend("triton")(images)
    for i, (e, r) in enumerate(zip(expected, got)):
        assert len(e["boxes"]) > 0
        assert torch.equal(r["labels"], e["labels"]), f"labels of image {i}"
        for k in ("boxes", "scores", "masks"):
            assert_close_verbose(r[k], e[k], ATOL, RTOL, f"{k} of image {i}")


def _compare_train(model, images, targets):
    model.train()
    results = []
    for backend in ("torch", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        torch.manual_seed(3)
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (expected, grads_e), (got, grads_g) = results
    for k in expected:
        assert_close_verbose(got[k].detach(), expected[k].detach(), 1e-5, 1e-4, k)
    assert grads_e.keys() == grads_g.keys()
    for n in grads_e:
        scale = grads_e[n].abs().max().item()
        assert (grads_g[n] - grads_e[n]).abs().max().item() <= 1e-3 * scale + 1e-7, n


@pytest.mark.model
@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="needs Triton's interpreter")
def test_triton_backend_matches_torch_cpu_interpreter():
    model = _model("resnet18", 4, **TINY_KW).eval()
    g = torch.Generator().manual_seed(2)
    images = [make_image(96, 120, g)]
    _compare_eval(model, images)
    _compare_train(model, images, [make_target(96, 120, 2, 4, g)])


def test_torch_backend_never_imports_triton():
    """A fresh interpreter (this test session has Triton loaded through torchvision) runs the
    model with backend="torch" where triton cannot be imported (torch's custom-op dispatcher
    would import it otherwise) and checks that fastmask's kernels were never imported."""
    code = ("import sys, torch, fastmask\n"
            "assert 'triton' not in sys.modules\n"
            "sys.modules['triton'] = None\n"
            "m = fastmask.build_mask_rcnn(3, backbone='resnet18', backend='torch', min_size=64, max_size=96,"
            " rpn_post_nms_top_n_test=20).eval()\n"
            "with torch.no_grad():\n"
            "    m([torch.rand(3, 64, 80)])\n"
            "bad = [k for k in sys.modules if k.startswith(('triton.', 'fastmask.kernels'))]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.model
@requires_cuda
def test_triton_backend_matches_torch_cuda(monkeypatch):
    # Full fp32: cuDNN's default TF32 convolutions round their inputs to 10-bit mantissas, so a
    # one-ulp difference in the RoI features (summation order) can flip that rounding and grow
    # to ~2e-4 in the mask probabilities (seen on an H200). The comparison is of the kernels.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _model("resnet50", 91, box_score_thresh=0.0).cuda().eval()
    g = torch.Generator().manual_seed(2)
    images = [make_image(h, w, g).cuda() for h, w in ((480, 640), (427, 640), (640, 480))]
    _compare_eval(model, images)
    targets = [{k: v.cuda() for k, v in make_target(h, w, n, 91, g).items()}
               for (h, w), n in (((480, 640), 5), ((427, 640), 0), ((640, 480), 3))]
    _compare_train(model, images, targets)
