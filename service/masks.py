"""Segmentation masks into answers: padding to the network's stride, per-class statistics, connected
components, and the mask and overlay PNGs. No model here, only arrays and Pillow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .images import png_bytes

# The palette when a card has none: one colour per class index (0 = background), distinct when blended
# over grey pixels. A segmenter's card carries its own (`palette`), used everywhere its masks are drawn.
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0),
], dtype=np.uint8)
OVERLAY_ALPHA = 0.55  # weight of the class colour over the input's pixels where a class is found


def pad_to_multiple(pixels: np.ndarray, stride: int, value: int) -> np.ndarray:
    """uint8 [C, H, W] -> [C, H', W'] with H', W' the next multiples of `stride`, padded right and bottom,
    so that cropping [:H, :W] of the output gives back the input's own grid."""
    _, height, width = pixels.shape
    pad_h, pad_w = -height % stride, -width % stride
    if pad_h == 0 and pad_w == 0:
        return pixels
    return np.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=value)


def mask_png(mask: np.ndarray) -> bytes:
    """uint8 [H, W] class indices -> a mode-L PNG whose pixel values are the class indices."""
    return png_bytes(Image.fromarray(mask, mode="L"))


def class_statistics(mask: np.ndarray, labels: list[str]) -> list[dict]:
    """Pixel count and fraction per class present, most frequent first, background included."""
    counts = np.bincount(mask.ravel(), minlength=len(labels))
    total = mask.size
    present = [k for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    return [{"index": int(k), "label": labels[k], "pixels": int(counts[k]), "fraction": round(counts[k] / total, 6)}
            for k in present]


def connected_components(mask: np.ndarray, labels: list[str]) -> list[dict]:
    """Every 8-connected region of one non-background class, with its bounding box (x0, y0 inclusive;
    x1, y1 exclusive, in input pixels) and its pixel count; largest first."""
    regions = []
    eight_connected = np.ones((3, 3), dtype=bool)
    for k in np.unique(mask):
        if k == 0:
            continue
        components, count = ndimage.label(mask == k, structure=eight_connected)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for component, box in enumerate(ndimage.find_objects(components), start=1):
            rows, cols = box
            regions.append({"index": int(k), "label": labels[k], "pixels": int(sizes[component]),
                            "box": {"x0": cols.start, "y0": rows.start, "x1": cols.stop, "y1": rows.stop}})
    return sorted(regions, key=lambda region: -region["pixels"])


def overlay_png(gray: np.ndarray, mask: np.ndarray, labels: list[str], palette: np.ndarray = PALETTE) -> bytes:
    """The input (grey, [H, W]) with each class's colour blended over its pixels, and a legend of the
    classes present below it. Small inputs are enlarged (nearest neighbour) so the legend stays legible."""
    height, width = mask.shape
    base = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    colours = palette[mask % len(palette)].astype(np.float32)
    found = (mask > 0)[:, :, None]
    blended = np.where(found, (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colours, base)
    image = Image.fromarray(blended.round().astype(np.uint8), mode="RGB")
    scale = max(1, -(-192 // max(height, width)))  # at least ~192 px on the long side
    if scale > 1:
        image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)

    present = [k for k in np.unique(mask) if k > 0]
    font = ImageFont.load_default()
    line = 14
    legend_height = 6 + line * max(1, len(present))
    canvas = Image.new("RGB", (max(image.width, 160), image.height + legend_height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 3
    if not present:
        draw.text((4, y), "no object found", fill=(0, 0, 0), font=font)
    for k in present:
        draw.rectangle((4, y + 2, 14, y + 11), fill=tuple(int(c) for c in palette[k % len(palette)]), outline=(0, 0, 0))
        draw.text((20, y), labels[k], fill=(0, 0, 0), font=font)
        y += line
    return png_bytes(canvas)
