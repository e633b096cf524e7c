"""Static-shape inference: the model as one graph, for ``torch.export``, ``torch.compile`` and
CUDA graphs.

``MaskRCNN.forward_padded`` runs inference with shapes that depend only on the input's shape
and without a host sync (padded proposals, padded detections with a count per image). This
module packages it:

- :class:`StaticDetector` wraps a model as a module whose ``forward(images: Tensor[B, 3, H, W])``
  is that path, the form ``torch.export.export`` and ``torch.compile(fullgraph=True)`` take;
  :func:`export` exports it for one input shape.
- :func:`export_onnx` writes it as an ONNX model whose fastmask ops are nodes of a custom
  ``fastmask`` domain (a runtime needs kernels for those five ops; onnxruntime has none).
- :func:`capture` records the path in a CUDA graph for one batch size and image size and
  returns a :class:`CapturedDetector`: each call copies the images in, replays the graph (one
  launch from the host for the whole model) and returns the padded outputs.

``fastmask.models.roi_heads.trim`` turns the padded outputs into ``model(images)``'s
per-image dicts (one host sync, for the counts).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, nn

from fastmask.models.mask_rcnn import MaskRCNN
from fastmask.models.roi_heads import trim
from fastmask.ops._checks import CHECKS_ENV_VAR

__all__ = ["StaticDetector", "export", "export_onnx", "capture", "CapturedDetector", "trim"]

# The fastmask ops the static path calls: what export_onnx translates to custom-domain nodes.
ONNX_OPS = ("rpn_proposals", "multiscale_roi_align", "decode_boxes", "nms_keep_mask", "paste_masks")
ONNX_DOMAIN = "fastmask"


class StaticDetector(nn.Module):
    """``model.forward_padded`` as a module: ``forward(images Tensor[B, 3, H, W]) -> dict`` of
    ``boxes``, ``labels``, ``scores``, ``masks``, ``counts``, ``truncated`` (see
    ``MaskRCNN.forward_padded``). Inference only: wrapping puts the model in eval mode."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        if not isinstance(model, MaskRCNN):
            raise TypeError(f"model must be a fastmask MaskRCNN, got {type(model).__name__}")
        self.model = model
        self.eval()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model.forward_padded(images)


def export(model: MaskRCNN, images: Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the static path for the shape of ``images`` Tensor[B, 3, H, W]
    (batch and image size fixed). ``model`` must be in eval mode; its backend and settings
    (``channels_last``, ``autocast_dtype``) are those of the exported program. The fastmask
    ops appear in the graph as ``torch.ops.fastmask.*`` calls, so the program runs where
    fastmask is importable: ``program.module()(images)``."""
    _check_eval(model)
    with torch.no_grad():
        return torch.export.export(StaticDetector(model), (images,))


def export_onnx(model: MaskRCNN, images: Tensor, path: str, **kwargs) -> None:
    """Write the static path for the shape of ``images`` Tensor[B, 3, H, W] to the ONNX file
    ``path`` (``torch.onnx.export`` with ``dynamo=True``; ``kwargs`` go to it).

    Each fastmask op becomes one node of the custom domain ``fastmask`` (version 1) named after
    it in CamelCase (``RpnProposals``, ``MultiscaleRoiAlign``, ``DecodeBoxes``,
    ``NmsKeepMask``, ``PasteMasks``): the op's tensor arguments are the node's inputs (a tensor
    list last, as variadic inputs), its other arguments attributes (bools as ints; the
    backend is dropped). ``onnx.checker`` accepts the model; running it needs a runtime with
    kernels for those five ops (onnxruntime refuses to load it without them). The outputs are
    named ``boxes, scores, labels, counts, truncated, masks``. Needs the ``onnx`` and
    ``onnxscript`` packages (``pip install "fastmask[onnx]"``).
    """
    _check_eval(model)
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError('export_onnx needs the onnx and onnxscript packages: pip install "fastmask[onnx]"') from e
    table = {getattr(torch.ops.fastmask, name).default: _onnx_node(name) for name in ONNX_OPS}
    table[torch.ops.aten.sort.stable] = _onnx_stable_sort
    kwargs.setdefault("output_names", ["boxes", "scores", "labels", "counts", "truncated", "masks"])
    with torch.no_grad():
        torch.onnx.export(StaticDetector(model), (images,), path, dynamo=True, custom_translation_table=table,
                          **kwargs)


def _onnx_node(name: str):
    """A translation of ``fastmask::name`` into one custom-domain node, built from the op's schema."""
    import onnxscript
    from onnx.defs import OpSchema

    schema = getattr(torch.ops.fastmask, name).default._schema
    option = OpSchema.FormalParameterOption
    attr_types = {"int": OpSchema.AttrType.INT, "bool": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT,
                  "List[int]": OpSchema.AttrType.INTS, "List[float]": OpSchema.AttrType.FLOATS}
    inputs, attrs = [], []  # (argument name, option) and (argument name, ONNX type, required)
    for arg in schema.arguments:
        kind = str(arg.type)
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        if kind == "Tensor":
            inputs.append((arg.name, option.Optional if optional else option.Single))
        elif kind == "List[Tensor]":
            inputs.append((arg.name, option.Variadic))
        elif kind in attr_types:
            attrs.append((arg.name, attr_types[kind], not optional))
        elif arg.name != "backend":
            raise TypeError(f"fastmask::{name}: no ONNX form for argument {arg.name} of type {arg.type}")
    inputs.sort(key=lambda item: item[1] == option.Variadic)  # ONNX: a variadic input comes last
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)",
             "tensor(int32)", "tensor(bool)", "tensor(uint8)"]
    onnx_schema = OpSchema(
        "".join(part.capitalize() for part in name.split("_")), ONNX_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, f"T{i}", param_option=o) for i, (n, o) in enumerate(inputs)],
        outputs=[OpSchema.FormalParameter(f"out{i}", f"Y{i}") for i in range(len(schema.returns))],
        type_constraints=[(f"T{i}", types, "") for i in range(len(inputs))]
        + [(f"Y{i}", types, "") for i in range(len(schema.returns))],
        attributes=[OpSchema.Attribute(n, t, "", required=r) for n, t, r in attrs])
    # Not registered with onnx.defs: a registered schema has no type inference, and the
    # exporter's optimiser would then drop the outputs' types.
    op = onnxscript.values.Op(onnxscript.values.Opset(ONNX_DOMAIN, 1), onnx_schema.name, onnx_schema)
    names = [a.name for a in schema.arguments]

    def translate(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        node_inputs = {n: (list(bound[n]) if o == option.Variadic else bound[n]) for n, o in inputs}
        node_attrs = {n: (int(bound[n]) if isinstance(bound[n], bool) else bound[n])
                      for n, _, _ in attrs if bound.get(n) is not None}
        # Inputs by keyword: the exporter's recorder mis-binds a positional variadic input.
        return op(**node_inputs, **node_attrs)

    return translate


def _onnx_stable_sort(x, stable=None, dim=-1, descending=False):
    """``aten.sort.stable`` (the static path's stable sorts) as ONNX TopK, which keeps equal
    values in index order: a stable sort."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort

    return aten_sort(x, dim=dim, descending=descending)


def _check_eval(model: nn.Module) -> None:
    if not isinstance(model, MaskRCNN):
        raise TypeError(f"model must be a fastmask MaskRCNN, got {type(model).__name__}")
    if model.training:
        raise RuntimeError("the static inference path needs the model in eval mode: call model.eval() first")


def capture(model: MaskRCNN, batch_size: int, image_size: Sequence[int], *, dtype: torch.dtype = torch.float32,
            warmup: int = 2) -> CapturedDetector:
    """Capture the model's static inference path in a CUDA graph.

    Args:
        model: a fastmask ``MaskRCNN`` in eval mode, on a CUDA device. Its settings at
            capture (backend, ``channels_last``, ``autocast_dtype`` such as bf16) are baked in.
        batch_size: images per call.
        image_size: ``(H, W)`` of every input image, before the model's resize.
        dtype: the input images' dtype.
        warmup: eager calls before the capture, on the capture stream (they compile the
            kernels and fill the device-side caches the graph then reads).

    Returns a :class:`CapturedDetector`. Raises RuntimeError on a model that is not on a
    CUDA device, and when ``FASTMASK_CHECKS=1`` (its data checks read the device: a sync,
    which a graph cannot hold).
    """
    return CapturedDetector(model, batch_size, image_size, dtype=dtype, warmup=warmup)


class CapturedDetector:
    """A model's static inference path, captured in a CUDA graph for one input shape (see
    :func:`capture`).

    ``detector(images)``: ``images`` a list of ``batch_size`` Tensor[3, H, W] or a
    Tensor[B, 3, H, W] of the captured size and dtype, on the model's device. Returns the
    padded outputs of ``MaskRCNN.forward_padded``. They are the graph's own buffers: the next
    call overwrites them (``copy=True`` returns copies). ``trim(outputs)`` gives the
    per-image dicts of ``model(images)``.
    """

    def __init__(self, model: MaskRCNN, batch_size: int, image_size: Sequence[int], *,
                 dtype: torch.dtype = torch.float32, warmup: int = 2):
        _check_eval(model)
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise RuntimeError(f"capture needs a model on a CUDA device (CUDA graphs); this model is on {device}. "
                               "On the CPU, use model.forward_padded or fastmask.inference.export")
        if os.environ.get(CHECKS_ENV_VAR) == "1":
            raise RuntimeError(f"capture cannot hold the data checks of {CHECKS_ENV_VAR}=1 (each reads the device); "
                               "unset it to capture")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        h, w = (int(v) for v in image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be a pair (H, W) of positive ints, got {image_size!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.model = model
        self.shape = (batch_size, 3, h, w)
        self.dtype = dtype
        self.device = device
        self._input = torch.zeros(self.shape, dtype=dtype, device=device)
        # Warm-up and capture on one stream: the device tables the path caches are cached per
        # stream, so the graph reads the ones the warm-up made.
        self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(self._stream):
            for _ in range(max(1, warmup)):
                model.forward_padded(self._input)
        torch.cuda.current_stream(device).wait_stream(self._stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph, stream=self._stream):
            self._output = model.forward_padded(self._input)

    def __call__(self, images: Sequence[Tensor] | Tensor, *, copy: bool = False) -> dict[str, Tensor]:
        self._load(images)
        self._graph.replay()
        if copy:
            return {k: v.clone() for k, v in self._output.items()}
        return self._output

    def _load(self, images) -> None:
        """Copy ``images`` into the graph's input buffer, refusing any other shape, dtype or device."""
        if isinstance(images, Tensor):
            got, dtype, device = tuple(images.shape), images.dtype, images.device
        elif isinstance(images, (list, tuple)) and all(isinstance(im, Tensor) for im in images) and images:
            shapes = {tuple(im.shape) for im in images}
            got = (len(images), *shapes.pop()) if len(shapes) == 1 else ("images of different sizes", *shapes)
            dtype, device = images[0].dtype, images[0].device
        else:
            raise TypeError("images must be a list of Tensor[3, H, W] or a Tensor[B, 3, H, W]")
        if got != self.shape:
            raise ValueError(f"this graph was captured for {self.shape[0]} images of 3x{self.shape[2]}x{self.shape[3]} "
                             f"(input Tensor{list(self.shape)}); got {got}. Capture another for that input")
        if dtype != self.dtype or device != self.device:
            raise ValueError(f"this graph was captured for {self.dtype} images on {self.device}; got {dtype} on "
                             f"{device}")
        if isinstance(images, Tensor):
            self._input.copy_(images)
        else:
            for slot, im in zip(self._input, images):
                slot.copy_(im)
