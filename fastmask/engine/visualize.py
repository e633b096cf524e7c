"""Overlays of detections on an image: translucent masks with outlines, boxes, class names and scores."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (one per instance, in turn).
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]
MASK_ALPHA = 0.45
# Small images are enlarged (by a whole factor) until the shorter side reaches this, so the
# labels stay legible.
MIN_DISPLAY_SIDE = 480


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _mask_regions(masks, n: int, h: int, w: int):
    """(y0, x0, mask) per detection, ``mask`` bool [h_i, w_i] at image pixel (y0, x0), and
    which of its four sides (top, bottom, left, right) lie on the image's edge. ``masks``: bool
    [N, H, W], or box-local ``(slabs [N, Hmax, Wmax], windows [N, 4] (x0, y0, x1, y1))``."""
    if isinstance(masks, tuple):
        slabs, windows = masks
        for i in range(n):
            x0, y0, x1, y1 = (int(v) for v in windows[i])
            yield y0, x0, slabs[i, :y1 - y0, :x1 - x0], (y0 == 0, y1 == h, x0 == 0, x1 == w)
    else:
        for i in range(n):
            yield 0, 0, masks[i], (True, True, True, True)


def _region_outline(mask: np.ndarray, on_edge) -> np.ndarray:
    """``_outline`` of a region of an image's mask, as it is in the whole image: past a side
    inside the image the mask is False (outside the box), past the image's edge it continues."""
    padded = np.pad(mask, 1, mode="edge")
    top, bottom, left, right = on_edge
    if not top:
        padded[0] = False
    if not bottom:
        padded[-1] = False
    if not left:
        padded[:, 0] = False
    if not right:
        padded[:, -1] = False
    return _outline(padded)[1:-1, 1:-1]


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels, scores, masks,
                    class_names: list[str]) -> Image.Image:
    """``image`` uint8 [H, W, 3]; ``boxes`` [N, 4] ``(x1, y1, x2, y2)``; ``masks`` bool [N, H, W],
    box-local ``(slabs, windows)`` as numpy arrays (``fastmask.ops.BoxMasks`` pasted with a
    threshold of at least 0, so False outside the boxes), or None."""
    h, w = image.shape[:2]
    scale = max(1, math.ceil(MIN_DISPLAY_SIDE / max(1, min(h, w))))
    canvas = image
    if scale > 1:  # the photo smoothly, the masks below by repetition (their edges stay exact)
        canvas = np.asarray(Image.fromarray(image).resize((w * scale, h * scale), Image.BILINEAR))
    canvas = canvas.astype(np.float32)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")  # best drawn last, on top
    colours = {int(i): np.array(PALETTE[rank % len(PALETTE)], np.float32)
               for rank, i in enumerate(order[::-1])}
    if masks is not None:
        regions = list(_mask_regions(masks, len(order), h, w))
        for i in order:
            y0, x0, m, on_edge = regions[i]
            if m.size == 0:  # a box with no pixel in the image
                continue
            if scale > 1:
                m = m.repeat(scale, 0).repeat(scale, 1)
            c = colours[int(i)]
            region = canvas[y0 * scale:y0 * scale + m.shape[0], x0 * scale:x0 * scale + m.shape[1]]
            region[m] = region[m] * (1 - MASK_ALPHA) + c * MASK_ALPHA
            region[_region_outline(m, on_edge)] = c
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font_size = max(11, round(min(out.size) / 40))
    font = _font(font_size)
    line = max(1, round(font_size / 8))
    for i in order:
        colour = tuple(int(v) for v in colours[int(i)])
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        name = class_names[int(labels[i])] if int(labels[i]) < len(class_names) else str(int(labels[i]))
        text = f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        tx = min(max(x1, 0), out.width - tw - 4)
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else min(y1 + line, out.height - th - 4)
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return out
