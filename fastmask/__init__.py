"""fastmask: Mask R-CNN (ResNet-50-FPN) in PyTorch with Triton kernels for its hot paths.

``fastmask.maskrcnn_resnet50_fpn(num_classes=91, backend=None, **kwargs)`` builds the model
(torchvision's keyword arguments and checkpoints); ``fastmask.ops`` holds the ops.
"""

__version__ = "0.1.0"


def _source_kernels() -> None:
    """Map ``fastmask.kernels`` to the repository's top-level ``kernels/`` folder in a source
    checkout that runs without being installed (``PYTHONPATH=checkout``, as on a bare GPU
    machine). Installing does this mapping itself (``package-dir`` in pyproject.toml); then
    this adds nothing. Nothing is imported here: the kernels (and Triton) load on first use."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (source / "__init__.py").is_file():
        return  # installed (the kernels live in the package), or not a checkout

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "fastmask.kernels":
                return None
            return importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                          submodule_search_locations=[str(source)])

    # Last, so that an editable install's own finder (which maps the same folder) comes first.
    sys.meta_path.append(_Finder())


_source_kernels()

from .models import MaskRCNN, build_mask_rcnn, load_weights, maskrcnn_resnet50_fpn  # noqa: E402
from . import inference  # noqa: E402  (static-shape inference: export, CUDA graphs)
from .accelerate import accelerate  # noqa: E402  (fastmask's ops in a torchvision model)

__all__ = ["MaskRCNN", "build_mask_rcnn", "load_weights", "maskrcnn_resnet50_fpn", "__version__"]
