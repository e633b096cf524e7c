"""Anchors for the RPN, the same boxes in the same order as torchvision's ``AnchorGenerator``.

Each feature level ``l`` has ``A_l = len(aspect_ratios[l]) * len(sizes[l])`` *cell anchors*:
zero-centred boxes ``(-w/2, -h/2, w/2, h/2)`` rounded to integers, with ``h/w`` the aspect
ratio and ``sqrt(w*h)`` the size, aspect ratio major and size minor. The anchors of the
level are the cell anchors shifted to every location of its ``H_l x W_l`` grid, ``stride``
pixels apart, where ``stride = padded_image_size // grid_size`` per axis. Anchors are listed
level by level, then location by location (row-major), then cell anchor by cell anchor.

Anchor ``j`` of level ``l`` is therefore, with ``p = j // A_l`` and ``a = j % A_l``::

    cell[l][a] + (col * stride_x, row * stride_y, col * stride_x, row * stride_y),
    row, col = p // W_l, p % W_l

:class:`AnchorGeometry` carries exactly this description (cell anchors, grid sizes,
strides), so the fused proposal kernel computes the few anchors it needs instead of
reading a [B, A, 4] anchor table (about 4 MB per 800x1216 image).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ._backend import check_backend_name
from ._checks import FLOAT_DTYPES, check_tensor


@dataclass(frozen=True)
class AnchorGeometry:
    """The anchors of a batch, described per level instead of listed.

    Attributes:
        cell_anchors: per level Tensor[A_l, 4], the zero-centred anchors of one location, in
            the anchors' dtype and device.
        cell_values: the same values as host floats (integers), per level a tuple of A_l
            ``(x1, y1, x2, y2)``; the proposal kernel's tables are built from them without
            reading the device.
        grid_sizes: per level ``(H_l, W_l)``.
        strides: per level ``(stride_y, stride_x)`` in pixels.
        num_images: images in the batch (they all share the same anchors, as in torchvision,
            because anchors depend on the padded batch size, not on each image's size).
    """

    cell_anchors: tuple[Tensor, ...]
    cell_values: tuple[tuple[tuple[float, float, float, float], ...], ...]
    grid_sizes: tuple[tuple[int, int], ...]
    strides: tuple[tuple[int, int], ...]
    num_images: int

    @property
    def num_anchors_per_level(self) -> list[int]:
        """``H_l * W_l * A_l`` per level."""
        return [h * w * c.shape[0] for (h, w), c in zip(self.grid_sizes, self.cell_anchors)]

    @property
    def dtype(self) -> torch.dtype:
        return self.cell_anchors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.cell_anchors[0].device

    def level_anchors(self) -> list[Tensor]:
        """Per level Tensor[H_l * W_l * A_l, 4], torchvision's ``grid_anchors``."""
        out = []
        for (gh, gw), (sy, sx), cell in zip(self.grid_sizes, self.strides, self.cell_anchors):
            # Integer shifts, promoted to the anchors' dtype when added, as in torchvision.
            shift_y = torch.arange(gh, dtype=torch.int64, device=cell.device) * sy
            shift_x = torch.arange(gw, dtype=torch.int64, device=cell.device) * sx
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
            out.append((shifts + cell.reshape(1, -1, 4)).reshape(-1, 4))
        return out

    def anchors(self) -> Tensor:
        """Tensor[A, 4]: every anchor of one image, all levels concatenated (A = sum of levels)."""
        return torch.cat(self.level_anchors())

    def flat(self) -> tuple[list[Tensor], list[float], list[int], list[int]]:
        """The geometry as flat lists, the form a registered op takes (schema types only): the
        cell anchors, their values row by row, ``(H, W)`` and ``(stride_y, stride_x)`` per level.
        :meth:`from_flat` inverts it."""
        return (list(self.cell_anchors), [float(v) for level in self.cell_values for row in level for v in row],
                [v for hw in self.grid_sizes for v in hw], [v for st in self.strides for v in st])

    @classmethod
    def from_flat(cls, cell_anchors: Sequence[Tensor], cell_values: Sequence[float], grid_sizes: Sequence[int],
                  strides: Sequence[int], num_images: int) -> AnchorGeometry:
        """The geometry from :meth:`flat`'s lists (cell values split by each level's anchor count)."""
        values, per_level = iter(cell_values), []
        for cell in cell_anchors:
            per_level.append(tuple(tuple(next(values) for _ in range(4)) for _ in range(cell.shape[0])))
        return cls(tuple(cell_anchors), tuple(per_level), tuple(zip(grid_sizes[::2], grid_sizes[1::2])),
                   tuple(zip(strides[::2], strides[1::2])), num_images)


def _as_nested(name: str, value) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty tuple of per-level tuples, got {value!r}")
    out = []
    for i, level in enumerate(value):
        if not isinstance(level, (tuple, list)) or len(level) == 0 or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in level):
            raise ValueError(f"{name}[{i}] must be a non-empty tuple of positive numbers, got {level!r}")
        out.append(tuple(level))
    return tuple(out)


class AnchorGenerator(nn.Module):
    """Drop-in for torchvision's ``AnchorGenerator``: ``gen(image_list, feature_maps)``.

    Args:
        sizes: per level, the anchor sizes (sqrt of the area) in pixels, e.g.
            ``((32,), (64,), (128,), (256,), (512,))`` for FPN. A flat tuple means one size
            per level (torchvision's convention).
        aspect_ratios: per level, the ratios ``h / w``; a flat tuple is used for every level.
        backend: accepted for a uniform API. Anchors are a broadcast add per level and are
            built with torch ops on every backend; the Triton proposal kernel does not read
            them at all but generates them from :meth:`geometry`.

    The module holds no parameters or buffers (``state_dict()`` is empty, like torchvision's);
    cell anchors are cached per (dtype, device) in a plain attribute.
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),), *, backend: str | None = None):
        super().__init__()
        if isinstance(sizes, (tuple, list)) and sizes and not isinstance(sizes[0], (tuple, list)):
            sizes = tuple((s,) for s in sizes)
        if isinstance(aspect_ratios, (tuple, list)) and aspect_ratios and not isinstance(aspect_ratios[0], (tuple, list)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        self.sizes = _as_nested("sizes", sizes)
        self.aspect_ratios = _as_nested("aspect_ratios", aspect_ratios)
        if len(self.sizes) != len(self.aspect_ratios):
            raise ValueError(f"sizes has {len(self.sizes)} levels but aspect_ratios has {len(self.aspect_ratios)}")
        if backend is not None:
            check_backend_name(backend)
        self.backend = backend
        self._cell_cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, ...]] = {}
        # The cell anchors on the CPU and as host values, computed here, eagerly: a model
        # traced by torch.compile / torch.export then reads only Python numbers.
        self._cpu_cells = tuple(self.generate_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios))
        self._value_cache: dict[torch.dtype, tuple] = {dt: self._values(dt) for dt in FLOAT_DTYPES}

    @staticmethod
    def generate_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
        """Tensor[len(aspect_ratios) * len(sizes), 4] fp32 zero-centred cell anchors of one level.

        Computed in fp32 on the CPU and rounded, exactly as torchvision does, so the anchors
        are integers and equal torchvision's in every dtype they are later cast to.
        """
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def cell_anchors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
        """Per level Tensor[A_l, 4] cell anchors in ``dtype`` on ``device`` (cached; while
        ``torch.compile`` / ``torch.export`` traces, constants of the graph, not cached)."""
        key = (dtype, torch.device(device))
        if key in self._cell_cache:
            return self._cell_cache[key]
        if torch.compiler.is_compiling():
            return tuple(torch.tensor(v, dtype=dtype, device=device) for v in self.cell_values(dtype))
        self._cell_cache[key] = tuple(a.to(dtype=dtype, device=device) for a in self._cpu_cells)
        return self._cell_cache[key]

    def cell_values(self, dtype: torch.dtype = torch.float32) -> tuple:
        """Per level, the cell anchors in ``dtype`` as host floats (cached; see AnchorGeometry)."""
        if dtype not in self._value_cache:
            self._value_cache[dtype] = self._values(dtype)
        return self._value_cache[dtype]

    def _values(self, dtype: torch.dtype) -> tuple:
        # Read from the CPU copies: no device sync.
        return tuple(tuple(tuple(row) for row in a.to(dtype).double().tolist()) for a in self._cpu_cells)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def geometry(self, image_list, feature_maps: Sequence[Tensor]) -> AnchorGeometry:
        """The :class:`AnchorGeometry` of a batch: what :meth:`forward` lists, described per level.

        ``image_list``: has ``.tensors`` Tensor[B, C, H, W] (the padded batch) and
        ``.image_sizes``; ``feature_maps``: per level Tensor[B, C_l, H_l, W_l], finest first.
        Anchors take the dtype and device of ``feature_maps[0]``.
        """
        tensors = getattr(image_list, "tensors", None)
        image_sizes = getattr(image_list, "image_sizes", None)
        if not isinstance(tensors, Tensor) or tensors.dim() != 4 or image_sizes is None:
            raise TypeError("image_list must have .tensors (Tensor[B, C, H, W]) and .image_sizes (list of (h, w))")
        if not isinstance(feature_maps, (list, tuple)) or len(feature_maps) != len(self.sizes):
            n = len(feature_maps) if isinstance(feature_maps, (list, tuple)) else type(feature_maps).__name__
            raise ValueError(f"feature_maps must be a list of {len(self.sizes)} Tensor[B, C, H, W] "
                             f"(one per anchor level), got {n}")
        for i, f in enumerate(feature_maps):
            check_tensor(f"feature_maps[{i}]", f, ndim=4, dtypes=FLOAT_DTYPES)
        img_h, img_w = tensors.shape[-2:]
        grid_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps)
        strides = tuple((img_h // gh if gh else 0, img_w // gw if gw else 0) for gh, gw in grid_sizes)
        for i, ((gh, gw), (sy, sx)) in enumerate(zip(grid_sizes, strides)):
            if gh == 0 or gw == 0 or sy == 0 or sx == 0:
                raise ValueError(f"feature_maps[{i}] has grid {gh}x{gw}, which does not fit the padded "
                                 f"image size {img_h}x{img_w} (each grid must be non-empty and no larger)")
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        return AnchorGeometry(self.cell_anchors(dtype, device), self.cell_values(dtype), grid_sizes, strides,
                              len(image_sizes))

    def forward(self, image_list, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        """One Tensor[A, 4] of anchors per image (equal for every image, separate tensors)."""
        geometry = self.geometry(image_list, feature_maps)
        if geometry.num_images == 0:
            return []  # no images, no anchor sets (as torchvision)
        anchors = geometry.anchors()
        return [anchors] + [anchors.clone() for _ in range(geometry.num_images - 1)]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
