"""Request bodies cut from real Fashion-MNIST test images, built once per Locust process.

Bodies are encoded before the load starts so that the load generator spends its CPU sending, not
encoding PNGs (client and server share the same few cores here). Multipart bodies are written by
hand for the same reason: one bytes object per request, no per-request form encoding.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loadtests.scenarios import BATCH_IMAGES

BOUNDARY = "visionserveloadtest7f3a"
MULTIPART_CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
SCENE_SIZE = 64  # the segmenter's training canvas (training/scenes.py)
ITEMS_PER_SCENE = 2


@dataclass(frozen=True)
class Payloads:
    single_images: list[bytes]  # multipart: one PNG in `images`
    image_batches: list[bytes]  # multipart: BATCH_IMAGES PNGs in `images`
    tensor_batches: list[bytes]  # .npy uint8 [BATCH_IMAGES, 1, 28, 28]
    scenes: list[bytes]  # multipart: one SCENE_SIZE x SCENE_SIZE PNG in `image`


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def multipart_files(field: str, files: list[bytes]) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) with every file as a PNG part named `field`."""
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def compose_scene(items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light-on-dark items [K, 28, 28] pasted at random places on a black canvas, as the segmenter's
    training scenes are; max() keeps the brighter pixel where two items overlap."""
    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE), np.uint8)
    for item in items:
        top, left = rng.integers(0, SCENE_SIZE - item.shape[0] + 1, size=2)
        region = canvas[top:top + item.shape[0], left:left + item.shape[1]]
        np.maximum(region, item, out=region)
    return canvas


def fashion_test_images(count: int, seed: int) -> np.ndarray:
    """`count` seeded Fashion-MNIST test-split images, uint8 [N, 28, 28]."""
    # numpy only (no torch import): a Locust worker builds its payloads while its master waits for heartbeats
    from formats.idx import FASHION_MNIST_DIR, find_idx, read_idx

    images = read_idx(find_idx(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte"), expected_ndim=3)
    return images[np.random.default_rng(seed).choice(len(images), count, replace=False)]


def build_payloads(seed: int = 0, variants: int = 32) -> Payloads:
    """`variants` distinct bodies of each kind (the users cycle through them)."""
    rng = np.random.default_rng(seed)
    images = fashion_test_images(variants * (1 + BATCH_IMAGES + ITEMS_PER_SCENE), seed)
    singles, batches, scene_items = np.split(images, [variants, variants * (1 + BATCH_IMAGES)])
    batches = batches.reshape(variants, BATCH_IMAGES, 28, 28)
    scene_items = scene_items.reshape(variants, ITEMS_PER_SCENE, 28, 28)
    return Payloads(
        single_images=[multipart_files("images", [png(image)]) for image in singles],
        image_batches=[multipart_files("images", [png(image) for image in batch]) for batch in batches],
        tensor_batches=[npy(batch[:, None]) for batch in batches],
        scenes=[multipart_files("image", [png(compose_scene(items, rng))]) for items in scene_items],
    )


def single_png_bodies(images_npy: str | Path) -> list[bytes]:
    """One multipart body (one PNG in `images`) per image of a uint8 [N, 28, 28] .npy file: what the
    single-image Locust users of the benchmarks and hardening runs send, built before the load starts."""
    return [multipart_files("images", [png(image)]) for image in np.load(images_npy)]


@functools.cache
def shared_payloads() -> Payloads:
    """One set per process, built at Locust's init event and shared by every user of the process."""
    return build_payloads()
