"""A released classifier's `embedding` and `probabilities` over an image set, by onnxruntime on its exported graph.

Shared by the similarity index (export/index.py) and the out-of-distribution fit (export/ood.py): both start from
the same features of the 60,000 Fashion-MNIST training images. Computing them for the CNN takes about a minute on
one core, so they are cached under runs/features/<model>-<sha256 prefix>-<set>.npy, keyed by the model's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

CACHE_DIR = Path("runs/features")


def classifier_session(model_dir: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run_outputs(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    """uint8 [N, C, H, W] -> {"probabilities": [N, K], "embedding": [N, D]}, in chunks of batch_size."""
    names = ["probabilities", "embedding"]
    chunks = [session.run(names, {"pixels": np.ascontiguousarray(images[i:i + batch_size])})
              for i in range(0, len(images), batch_size)]
    return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}


def cached_outputs(model_dir: Path, set_name: str, images: np.ndarray, cache_dir: Path = CACHE_DIR,
                   threads: int = 2) -> dict[str, np.ndarray]:
    """run_outputs, cached by the model's sha256 and the images' own sha256 (a changed set is recomputed)."""
    card = json.loads((model_dir / "card.json").read_text())
    images_digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    path = cache_dir / f"{card['name']}-{card['sha256'][:16]}-{set_name}-{images_digest}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    outputs = run_outputs(classifier_session(model_dir, threads), images)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **outputs)
    return outputs
