"""Segmentation scenes: Fashion-MNIST items pasted onto a black canvas, with a per-pixel label map.

    python -m training.scenes --out runs/scenes.png          # a sheet of example scenes beside their masks

A scene is a canvas (64x64 by default) holding 1 to 4 items drawn uniformly from a split, each resized
(bilinear, as F.interpolate) by a scale drawn uniformly from 0.8 to 1.6 and pasted at a uniform random
position, in order, so later items occlude earlier ones. Everything is drawn from one seeded generator:
the same seed gives the same bytes. Training scenes come from training images only, test scenes from test
images only (`fixed_test_scenes`), so no garment seen in training ever appears in a test scene.

Labels: 0 is background; a pixel is labelled k+1 (k the item's Fashion-MNIST class) where the resized item
is brighter than ITEM_THRESHOLD. Composition, item by item:
- where the new item is above the threshold it overwrites both the image and the labels (occlusion);
- where it is at or below the threshold it is drawn with max(), so its soft anti-aliased rim shows over the
  background but never darkens or relabels an item underneath.
Hence `mask == 0` exactly where `image <= ITEM_THRESHOLD`: the label is a function of what is visible.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from training.data import FASHION_MNIST_LABELS, Dataset, load_dataset

# 40 of 255 (16%): Fashion-MNIST items sit on exact zeros, and the faintest 16% is where the bilinear resize's
# rims and the garments' thinnest texture live; above it a pixel is plainly part of the item. A lower value
# labels blurry halos as garment, a higher one punches holes into dark garments (sandals, dark shirts).
ITEM_THRESHOLD = 40
SCALE_RANGE = (0.8, 1.6)
MAX_ITEMS = 4
SCENE_LABELS = ["background"] + FASHION_MNIST_LABELS
NUM_SCENE_CLASSES = len(SCENE_LABELS)  # 11
# The released test set: 2,000 scenes from the test split with this seed, at the canvas size a model trains on.
TEST_SCENES = 2000
TEST_SCENE_SEED = 20_000_004
# Seeds of a training run's fixed scene sets sit far from the per-epoch seeds (seed * 1000 + epoch).
VAL_SCENE_SEED_OFFSET = 10_000_000
STATS_SCENE_SEED_OFFSET = 30_000_000


@dataclass
class Scenes:
    images: torch.Tensor     # uint8 [N, 1, H, W]
    masks: torch.Tensor      # uint8 [N, H, W]: 0 background, k+1 for class k
    instances: torch.Tensor  # uint8 [N, H, W]: 0 background, t+1 where slot t is the visible item
    items: torch.Tensor      # int64 [N, T]: index into the source split, -1 for an empty slot
    classes: torch.Tensor    # int64 [N, T]: class of each placed item, -1 for an empty slot
    boxes: torch.Tensor      # int64 [N, T, 4]: top, left, height, width of each item on the canvas
    source: str = ""         # the split the items came from, e.g. "fashion-mnist:test"

    def __len__(self) -> int:
        return self.images.shape[0]


def draw_layout(n: int, n_source: int, item_shape: tuple[int, int], height: int, width: int, seed: int,
                min_items: int = 1, max_items: int = MAX_ITEMS, scale_range: tuple[float, float] = SCALE_RANGE,
                ) -> dict[str, torch.Tensor]:
    """Every random choice of `n` scenes, drawn up front so that composing in chunks cannot change them."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(min_items, max_items + 1, (n,), generator=g)
    items = torch.randint(0, n_source, (n, max_items), generator=g)
    scales = torch.empty(n, max_items).uniform_(scale_range[0], scale_range[1], generator=g)
    uy, ux = torch.rand(n, max_items, generator=g), torch.rand(n, max_items, generator=g)
    flips = torch.rand(n, max_items, generator=g) < 0.5  # drawn always, used only by augmented training scenes
    present = torch.arange(max_items) < counts.unsqueeze(1)
    size_y = (scales * item_shape[0]).round().long().clamp(min=1)
    size_x = (scales * item_shape[1]).round().long().clamp(min=1)
    # Positions keep the item inside the canvas when it fits; a larger item is cropped at a random offset.
    lo_y, hi_y = torch.clamp(height - size_y, max=0), torch.clamp(height - size_y, min=0)
    lo_x, hi_x = torch.clamp(width - size_x, max=0), torch.clamp(width - size_x, min=0)
    top = lo_y + (uy * (hi_y - lo_y + 1)).long().clamp(max=hi_y - lo_y)
    left = lo_x + (ux * (hi_x - lo_x + 1)).long().clamp(max=hi_x - lo_x)
    return {"items": torch.where(present, items, -1), "present": present, "flips": flips,
            "boxes": torch.stack([top, left, size_y, size_x], dim=-1)}


def resize_weights(start: torch.Tensor, size: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """Bilinear weights [M, n_out, n_in] that resize n_in pixels to `size` and paste them at `start`.

    The source coordinate of output pixel j is (j - start + 0.5) * n_in / size - 0.5, clamped at 0, which is
    F.interpolate(mode="bilinear", align_corners=False)'s formula; outputs outside [start, start + size) get
    no weight, so the canvas stays black there.
    """
    m = start.shape[0]
    dst = torch.arange(n_out, dtype=torch.float32).view(1, n_out)
    start, size = start.view(m, 1), size.view(m, 1)
    src = ((dst - start + 0.5) * (n_in / size.float()) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.float()
    inside = ((dst >= start) & (dst < start + size)).float()
    weights = torch.zeros(m, n_out, n_in)
    weights.scatter_add_(2, lo.unsqueeze(-1), ((1 - frac) * inside).unsqueeze(-1))
    weights.scatter_add_(2, hi.unsqueeze(-1), (frac * inside).unsqueeze(-1))
    return weights


def render_items(items: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize each item [M, ih, iw] to its box and paste it on an empty canvas: float [M, H, W], 0..255.

    Bilinear resizing is separable, so resizing every item to its own size (they come in ~25 sizes) and
    pasting it is two batched matrix products, rows @ item @ columns^T, instead of one F.interpolate and one
    paste per item; it matches F.interpolate to within rounding (1 of 255 on a few pixels).
    """
    _, ih, iw = items.shape
    rows = resize_weights(boxes[:, 0], boxes[:, 2], height, ih)     # [M, H, ih]
    columns = resize_weights(boxes[:, 1], boxes[:, 3], width, iw)   # [M, W, iw]
    return torch.bmm(torch.bmm(rows, items.float()), columns.transpose(1, 2)).round_().clamp_(0, 255)


def compose(layers: torch.Tensor, classes: torch.Tensor, present: torch.Tensor, threshold: int = ITEM_THRESHOLD,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack rendered items [B, T, H, W] back to front: returns image, labels and instances, each [B, H, W]."""
    b, t_max, height, width = layers.shape
    image = torch.zeros(b, height, width)
    labels = torch.zeros(b, height, width, dtype=torch.uint8)
    instances = torch.zeros(b, height, width, dtype=torch.uint8)
    for t in range(t_max):
        layer = layers[:, t] * present[:, t].view(b, 1, 1)
        solid = layer > threshold
        image = torch.where(solid, layer, torch.maximum(image, layer))
        labels = torch.where(solid, (classes[:, t] + 1).to(torch.uint8).view(b, 1, 1), labels)
        instances = torch.where(solid, torch.tensor(t + 1, dtype=torch.uint8), instances)
    return image.to(torch.uint8), labels, instances


def make_scenes(source: Dataset, n: int, seed: int, height: int = 64, width: int = 64, min_items: int = 1,
                max_items: int = MAX_ITEMS, scale_range: tuple[float, float] = SCALE_RANGE, flip: bool = False,
                threshold: int = ITEM_THRESHOLD, chunk: int = 256) -> Scenes:
    """`n` scenes of items from `source` (one split only), deterministic in `seed`.

    `flip` mirrors each item with probability 1/2 (garments are left-right symmetric, so the label holds):
    augmentation for training scenes only. `chunk` bounds memory (about 150 kB per scene at 64x64)
    and does not change the result.
    """
    if source.images.shape[1] != 1:
        raise ValueError(f"scenes are grayscale; {source.name} has {source.images.shape[1]} channels")
    item_shape = tuple(source.images.shape[2:])
    layout = draw_layout(n, len(source), item_shape, height, width, seed, min_items, max_items, scale_range)
    items, present, boxes = layout["items"], layout["present"], layout["boxes"]
    classes = torch.where(present, source.labels[items.clamp(min=0)], -1)
    images = torch.empty(n, 1, height, width, dtype=torch.uint8)
    masks = torch.empty(n, height, width, dtype=torch.uint8)
    instances = torch.empty(n, height, width, dtype=torch.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        b = sl.stop - sl.start
        pixels = source.images[items[sl].clamp(min=0).flatten(), 0]  # [b*T, ih, iw]
        if flip:
            mirror = layout["flips"][sl].flatten().view(-1, 1, 1)
            pixels = torch.where(mirror, pixels.flip(-1), pixels)
        layers = render_items(pixels, boxes[sl].reshape(-1, 4), height, width).view(b, max_items, height, width)
        images[sl, 0], masks[sl], instances[sl] = compose(layers, classes[sl], present[sl], threshold)
    return Scenes(images, masks, instances, items, classes, boxes, source.name)


def scene_label_names(source: Dataset) -> list[str]:
    return ["background"] + list(source.label_names)


def fixed_test_scenes(n: int = TEST_SCENES, seed: int = TEST_SCENE_SEED, height: int = 64, width: int = 64,
                      test: Dataset | None = None, data_dir: str | Path | None = None) -> Scenes:
    """The released test set: scenes from the Fashion-MNIST test split only, the same bytes on every machine."""
    test = test if test is not None else load_dataset("fashion-mnist", "test", data_dir)
    return make_scenes(test, n, seed, height, width)


def write_example_sheet(path: str | Path, scenes: Scenes, label_names: list[str], count: int = 8,
                        title: str = "") -> None:
    """A PNG of example scenes beside their colour-coded masks (matplotlib)."""
    from training.plots import plot_scenes  # matplotlib only when a picture is asked for

    plot_scenes(scenes.images[:count], scenes.masks[:count], label_names, path, title=title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scenes.png", help="PNG to write")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--canvas", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST location")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    source = load_dataset("fashion-mnist", args.split, args.data_dir)
    scenes = make_scenes(source, args.count, args.seed, *args.canvas)
    write_example_sheet(args.out, scenes, scene_label_names(source), args.count,
                        f"{args.split} scenes, seed {args.seed}, threshold {ITEM_THRESHOLD}")
    return Path(args.out)


if __name__ == "__main__":
    main(parse_args())
