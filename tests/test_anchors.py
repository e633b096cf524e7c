"""AnchorGenerator: the same anchors in the same order as torchvision's, and its geometry."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fastmask.ops import AnchorGenerator
from fastmask.ops.anchors import AnchorGeometry
from helpers import requires_cuda

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5


def fpn_batch(height, width, image_sizes, dtype=torch.float32, device="cpu", channels=2):
    """A padded batch and FPN-like feature maps (strides 4..64, sizes rounded up like a backbone)."""
    images = ImageList(torch.zeros(len(image_sizes), 3, height, width, device=device), image_sizes)
    feats = []
    for s in (4, 8, 16, 32, 64):
        feats.append(torch.zeros(len(image_sizes), channels, -(-height // s), -(-width // s), dtype=dtype,
                                 device=device))
    return images, feats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [(128, 160), (100, 132)])
def test_fpn_anchors_match_torchvision(dtype, padded):
    images, feats = fpn_batch(*padded, [(padded[0] - 8, padded[1]), (padded[0], padded[1] - 30)], dtype)
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    theirs = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)
    assert ours[0].data_ptr() != ours[1].data_ptr()  # one tensor per image, as torchvision


def test_empty_batch_gives_no_anchor_sets():
    """Zero images: torchvision returns an empty list, and so does the generator."""
    images, feats = fpn_batch(64, 64, [])
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert ours == [] and TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats) == []


@pytest.mark.parametrize("sizes, ratios", [
    (((128, 256, 512),), ((0.5, 1.0, 2.0),)),  # torchvision's default: one level, 9 cell anchors
    ((16, 40), (0.25, 1.0, 3.0)),  # flat forms: one size per level, ratios shared
])
def test_other_configurations_match_torchvision(sizes, ratios):
    ours_gen, tv_gen = AnchorGenerator(sizes, ratios), TVAnchorGenerator(sizes, ratios)
    levels = len(ours_gen.sizes)
    images = ImageList(torch.zeros(1, 3, 96, 70), [(90, 70)])
    feats = [torch.zeros(1, 2, 96 // 2 ** (i + 3), 70 // 2 ** (i + 3)) for i in range(levels)]
    assert ours_gen.num_anchors_per_location() == tv_gen.num_anchors_per_location()
    assert torch.equal(ours_gen(images, feats)[0], tv_gen(images, feats)[0])


def test_no_state_and_counts():
    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    assert len(gen.state_dict()) == 0
    assert list(gen.parameters()) == [] and list(gen.buffers()) == []
    assert gen.num_anchors_per_location() == [3] * 5
    images, feats = fpn_batch(128, 160, [(128, 160)])
    gen(images, feats)
    assert len(gen.state_dict()) == 0  # caching cell anchors adds no state


def test_geometry_describes_the_anchors():
    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    images, feats = fpn_batch(100, 132, [(100, 132), (90, 100)])
    geo = gen.geometry(images, feats)
    anchors = gen(images, feats)[0]
    assert isinstance(geo, AnchorGeometry) and geo.num_images == 2
    assert geo.num_anchors_per_level == [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    assert torch.equal(geo.anchors(), anchors)
    assert geo.strides[0] == (100 // 25, 132 // 33)
    # The closed form the proposal kernel uses, for every anchor of every level.
    start = 0
    for lvl, count in enumerate(geo.num_anchors_per_level):
        j = torch.arange(count)
        cells = torch.tensor(geo.cell_values[lvl], dtype=torch.float64)
        assert torch.equal(cells.float(), geo.cell_anchors[lvl])
        loc, cell = j // cells.shape[0], j % cells.shape[0]
        row, col = loc // geo.grid_sizes[lvl][1], loc % geo.grid_sizes[lvl][1]
        sy, sx = geo.strides[lvl]
        shift = torch.stack([col * sx, row * sy, col * sx, row * sy], dim=1).double()
        assert torch.equal((shift + cells[cell]).float(), anchors[start:start + count])
        start += count


def test_geometry_flat_round_trip():
    """The registered proposal op takes the geometry as flat lists: from_flat(flat()) is it."""
    images, feats = fpn_batch(96, 128, [(96, 120), (90, 128)])
    geo = AnchorGenerator(FPN_SIZES, ((0.5, 1.0),) * 5).geometry(images, feats)
    back = AnchorGeometry.from_flat(*geo.flat(), geo.num_images)
    assert (back.cell_values, back.grid_sizes, back.strides, back.num_images) == \
        (geo.cell_values, geo.grid_sizes, geo.strides, geo.num_images)
    assert all(a is b for a, b in zip(back.cell_anchors, geo.cell_anchors))
    assert torch.equal(back.anchors(), geo.anchors())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator(FPN_SIZES, ((0.5, 1.0),) * 4)
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(((32, -1),))
    with pytest.raises(ValueError, match="backend"):
        AnchorGenerator(backend="cuda")
    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    images, feats = fpn_batch(128, 160, [(128, 160)])
    with pytest.raises(ValueError, match="feature_maps"):
        gen(images, feats[:4])
    with pytest.raises(TypeError, match="image_list"):
        gen(torch.zeros(1, 3, 128, 160), feats)
    with pytest.raises(ValueError, match="does not fit"):
        gen(ImageList(torch.zeros(1, 3, 16, 16), [(16, 16)]), feats)
    with pytest.raises(ValueError, match="dimensions"):
        gen(images, [f[0] for f in feats])


@requires_cuda
def test_fpn_anchors_match_torchvision_cuda():
    images, feats = fpn_batch(800, 1216, [(800, 1199), (750, 1216)], device="cuda")
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    theirs = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    for a, b in zip(ours, theirs):
        assert a.device == b.device and torch.equal(a, b)
