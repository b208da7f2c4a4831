"""Locust users for bench_serve.py: each posts one Fashion-MNIST test image as a PNG to /classify, in a closed loop.

Run by bench_serve.py headless; by hand:
  BENCH_IMAGES_NPY=/tmp/images.npy .venv/bin/locust -f benchmarks/locust_single_image.py --headless \
      -u 32 -r 32 -t 60s -H http://127.0.0.1:3000
"""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
from locust import FastHttpUser, task
from PIL import Image

BOUNDARY = "benchboundary7f3a"


def multipart_png_body(pixels: np.ndarray) -> bytes:
    """One `images` file part; built once per image so that the client spends its CPU on sending."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()


def load_bodies() -> list[bytes]:
    images = np.load(os.environ["BENCH_IMAGES_NPY"])  # uint8 [N, 28, 28]
    return [multipart_png_body(image) for image in images]


BODIES = itertools.cycle(load_bodies())
MODEL = os.environ.get("BENCH_MODEL", "")


class SingleImageClient(FastHttpUser):
    @task
    def classify_one_png(self) -> None:
        url = "/classify" + (f"?model={MODEL}" if MODEL else "")
        self.client.post(url, data=next(BODIES), name="/classify 1 png",
                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
