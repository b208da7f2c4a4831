"""What every peer server shares: the released CNN graph in onnxruntime on one thread, and the answer.

Each peer is the plain code a user would write: decode the PNG with Pillow, grayscale 28x28, run the session,
answer the top label and its probability. Read by the peer apps at start-up (never at import of peers.py).
Environment: PEER_MODEL (model.onnx), PEER_CARD (its card.json, for the labels).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread per worker, as visionserve runs with one worker per core
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.environ["PEER_MODEL"], options, providers=["CPUExecutionProvider"])


def load_labels() -> list[str]:
    with open(os.environ["PEER_CARD"]) as f:
        return json.load(f)["labels"]


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [1, 28, 28]."""
    image = Image.open(io.BytesIO(data)).convert("L")
    if image.size != (28, 28):
        image = image.resize((28, 28))
    return np.asarray(image, dtype=np.uint8)[None]


def classify(session: ort.InferenceSession, labels: list[str], pixels: np.ndarray) -> list[dict]:
    """uint8 [N, 1, 28, 28] -> one {label, probability} per image."""
    probabilities = session.run(["probabilities"], {"pixels": pixels})[0]
    top = probabilities.argmax(axis=1)
    return [{"label": labels[i], "probability": float(p[i])} for i, p in zip(top, probabilities)]
