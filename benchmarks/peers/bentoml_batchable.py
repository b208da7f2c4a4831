"""(d) BentoML's documented adaptive-batching pattern: a service class, `@bentoml.api(batchable=True)`.

The typed API takes the multipart `images` field as a list of PIL images; BentoML's batcher concatenates the
lists of concurrent requests (max_batch_size 64, BentoML's default max_latency_ms) and splits the answers.
Served from the main venv, with the BentoML that visionserve ships:

    PEER_MODEL=... PEER_CARD=... PEER_WORKERS=2 .venv/bin/bentoml serve bentoml_batchable:PeerBatchable \
        --working-dir benchmarks/peers --port 8003
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL.Image import Image

import common


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "1")))
class PeerBatchable:
    def __init__(self) -> None:
        self.session, self.labels = common.load_session(), common.load_labels()

    @bentoml.api(batchable=True, max_batch_size=64)
    def classify(self, images: list[Image]) -> list[dict]:
        pixels = np.stack([np.asarray(image.convert("L").resize((28, 28)), dtype=np.uint8)[None]
                           for image in images])
        return common.classify(self.session, self.labels, pixels)
