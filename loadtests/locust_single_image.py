"""Locust user for the closed-loop benchmarks (benchmarks/bench_serve.py, benchmarks/peers.py): each posts one
Fashion-MNIST test image as a PNG to /classify, in a closed loop.

Run headless by those benchmarks; by hand, from the repository root:
  BENCH_IMAGES_NPY=/tmp/images.npy .venv/bin/locust -f loadtests/locust_single_image.py --headless \\
      -u 32 -r 32 -t 60s -H http://127.0.0.1:3000
BENCH_MODEL names the model (default: the server's default classifier).
"""

from __future__ import annotations

import itertools
import os

from locust import FastHttpUser, task

from loadtests.payloads import MULTIPART_CONTENT_TYPE, single_png_bodies

BODIES = itertools.cycle(single_png_bodies(os.environ["BENCH_IMAGES_NPY"]))
MODEL = os.environ.get("BENCH_MODEL", "")


class SingleImageClient(FastHttpUser):
    @task
    def classify_one_png(self) -> None:
        url = "/classify" + (f"?model={MODEL}" if MODEL else "")
        self.client.post(url, data=next(BODIES), name="/classify 1 png", headers={"Content-Type": MULTIPART_CONTENT_TYPE})
