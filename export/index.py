"""The similarity index of a released classifier: its embeddings of the 60,000 Fashion-MNIST training images in a
faiss index, written to models/<name>/similarity.faiss with its checksum and measured recall in the card.

    python -m export.index --model models/cnn          # what `make index` runs for each model that fits

faiss-cpu's IndexScalarQuantizer with fp16 codes and L2: exact search over half-precision vectors, 15.4 MB for the
CNN's 128-d features, recall@10 0.9985 against float32 exact search (benchmarks/results/index.md says why this one).
The service loads the file at start-up and never builds an index at request time; the training images themselves
(thumbnails, labels) are read from the IDX files named, with their sha256, in the same card section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export.features import cached_outputs
from training.data import FASHION_MNIST_DIR, load_dataset, sha256_file

INDEX_FILE = "similarity.faiss"
MAX_FILE_BYTES = 20_000_000  # no file over 20 MB in git
MIN_RECALL = 0.99
QUERIES = 1000
K = 10


def build_index(vectors: np.ndarray):
    import faiss

    index = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    index.train(vectors)
    index.add(vectors)
    return index


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    distances = (base.astype(np.float64) ** 2).sum(1)[None, :] - 2.0 * queries.astype(np.float64) @ base.T
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def recall_at_k(index, base: np.ndarray, queries: np.ndarray, k: int) -> float:
    found = index.search(queries, k)[1]
    truth = exact_neighbours(base, queries, k)
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def reference_files(data_dir: Path) -> dict[str, str]:
    """The training split's IDX files (by name) and their sha256: the service checks them at start-up."""
    files = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        path = next(p for p in (data_dir / stem, data_dir / f"{stem}.gz") if p.is_file())
        files[path.name] = sha256_file(path)
    return files


def main(argv: list[str] | None = None) -> dict:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a released classifier's folder, e.g. models/cnn")
    p.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR)
    args = p.parse_args(argv)
    card_path = args.model / "card.json"
    card = json.loads(card_path.read_text())
    train = load_dataset("fashion-mnist", "train", args.data_dir)
    test = load_dataset("fashion-mnist", "test", args.data_dir)
    base = np.ascontiguousarray(cached_outputs(args.model, "train", train.images.numpy())["embedding"], np.float32)
    queries = np.ascontiguousarray(
        cached_outputs(args.model, "test", test.images.numpy())["embedding"][:QUERIES], np.float32)
    index = build_index(base)
    recall = recall_at_k(index, base, queries, K)
    path = args.model / INDEX_FILE
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    if size > MAX_FILE_BYTES or recall < MIN_RECALL:
        path.unlink()
        print(f"{card['name']}: index of {size} bytes, recall@10 {recall:.4f}: over {MAX_FILE_BYTES} bytes or under "
              f"{MIN_RECALL}; not written", file=sys.stderr)
        return {}
    section = {
        "file": INDEX_FILE, "sha256": sha256_file(path), "file_bytes": size,
        "library": f"faiss-cpu {faiss.__version__}", "kind": "IndexScalarQuantizer QT_fp16, METRIC_L2 (flat: exact "
        "search over fp16 vectors)", "output": "embedding", "vectors": int(index.ntotal), "dimension": base.shape[1],
        "distance": "euclidean (square root of faiss's squared L2)",
        "reference_set": {"dataset": "fashion-mnist", "split": "train", "images": len(base),
                          "files": reference_files(args.data_dir)},
        "recall_at_10": round(recall, 4), "recall_queries": f"first {QUERIES} test images, against float32 exact search",
        "command": f"python -m export.index --model {args.model}",
    }
    card.setdefault("features", {})["similarity"] = section
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{card['name']}: {path} {size / 1e6:.1f} MB, recall@10 {recall:.4f}", flush=True)
    return section


if __name__ == "__main__":
    main()
