"""Detection overlays: box-local masks draw the same image as full-image masks."""

import numpy as np
import torch

from fastmask.engine.visualize import draw_detections
from fastmask.ops import paste_masks, paste_masks_in_boxes


def test_box_local_masks_draw_the_same_overlay_as_full_masks():
    g = torch.Generator().manual_seed(0)
    h, w = 37, 53  # small: the overlay is enlarged 13x, masks by repetition
    image = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    boxes = torch.tensor([[3.0, 4.0, 20.5, 30.0],     # inside
                          [-5.0, -3.0, 12.0, 9.0],    # past the top-left corner
                          [40.0, 20.0, 60.0, 45.0],   # past the bottom-right corner
                          [0.0, 0.0, 53.0, 37.0],     # the whole image
                          [70.0, 50.0, 80.0, 60.0]])  # off the image: no pixel
    masks = torch.rand(len(boxes), 1, 14, 14, generator=g)
    full = paste_masks(masks, boxes, (h, w), threshold=0.5)[:, 0]
    slabs, windows = paste_masks_in_boxes(masks, boxes, threshold=0.5, image_size=(h, w))
    assert full.any() and full[:, 0].any() and full[:, -1].any()  # masks reach the image's edges
    # Rectangles drawn off the image (labels in its bottom-right corner), so that the masks'
    # outlines along the image's edges stay visible.
    args = (image, boxes.numpy() + 10_000, [0, 1, 2, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5])
    names = ["a", "b", "c"]
    expected = np.asarray(draw_detections(*args, full.numpy(), names))
    got = np.asarray(draw_detections(*args, (slabs.numpy(), windows.numpy()), names))
    assert np.array_equal(got, expected)
    assert not np.array_equal(expected, np.asarray(draw_detections(*args, None, names)))  # masks are drawn


def test_box_local_outline_closes_at_the_box_and_opens_at_the_image_edge():
    """A box-local mask True up to its window's sides: outlined along the sides inside the
    image (past them the mask is False), not along the image's edge (as a full mask is)."""
    h, w = 30, 40
    image = np.full((h, w, 3), 100, np.uint8)
    windows = np.array([[5, 6, 17, 20], [0, 0, 10, 8]])  # inside; at the top-left corner
    slabs = np.zeros((2, 14, 12), bool)
    slabs[0, :14, :12] = True
    slabs[1, :8, :10] = True
    full = np.zeros((2, h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(windows):
        full[i, y0:y1, x0:x1] = slabs[i, :y1 - y0, :x1 - x0]
    args = (image, np.full((2, 4), 10_000.0), [0, 0], [0.9, 0.8])
    expected = np.asarray(draw_detections(*args, full, ["a"]))
    assert np.array_equal(np.asarray(draw_detections(*args, (slabs, windows), ["a"])), expected)
