"""The same load for every peer: POST /classify with one real Fashion-MNIST test PNG (multipart field `images`),
a 200 or it counts as a failure. PEERS_PNG: the PNG file. Run by benchmarks/peers.py headless; by hand:

    PEERS_PNG=/tmp/x.png .venv/bin/locust -f benchmarks/peers/locustfile.py --headless -u 32 -r 32 -t 30s \
        -H http://127.0.0.1:8001
"""

from __future__ import annotations

import os

from locust import FastHttpUser, task

BOUNDARY = "peersboundary51c9"
with open(os.environ["PEERS_PNG"], "rb") as _png:
    BODY = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + _png.read() + f"\r\n--{BOUNDARY}--\r\n".encode()
HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class OnePngClient(FastHttpUser):
    @task
    def classify(self) -> None:
        with self.client.post("/classify", data=BODY, headers=HEADERS, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
