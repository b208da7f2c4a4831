"""The released autoencoder's reconstruction error as an out-of-distribution score: AUROC and FPR at 95% TPR per set.

    python -m benchmarks.ood_autoencoder          # writes benchmarks/results/ood_autoencoder.{json,md}

In-distribution: the 10,000 Fashion-MNIST test images. Out of distribution: the classifiers' offline sets, built
by export/evaluate_ood.py's `ood_sets` (1,000 each, seeded): scikit-learn's 8x8 digits upscaled and centred on
28x28, the test images inverted, uniform noise, Gaussian noise, random 28x28 crops of two-item scenes. The score
is the graph's own `error` output (mean squared difference per pixel), run by onnxruntime on the exported model;
no threshold is fitted, so AUROC needs no validation split. The classifiers' embedding-based methods are in
benchmarks/results/ood.md, measured on the same sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.report import write_results
from export.evaluate_ood import auroc, fpr_at_95_tpr, ood_sets
from export.onnx_io import run_batched
from training.data import load_dataset

RESULTS = Path("benchmarks/results")


def evaluate(model_dir: Path, data_dir: str | None = None, limit: int | None = None) -> dict:
    card = json.loads((model_dir / "card.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    test = load_dataset(card["metrics"].get("dataset", "fashion-mnist"), "test", data_dir)
    sets = ood_sets(test)
    if limit:
        sets = {name: images[:limit] for name, images in sets.items()}
    in_images = test.images.numpy()[:limit] if limit else test.images.numpy()
    (in_scores,) = run_batched(session, {"pixels": in_images}, batch_size=1000)[1:2]
    rows = {}
    for name, images in sets.items():
        scores = run_batched(session, {"pixels": images}, batch_size=1000)[1]
        rows[name] = {"images": int(len(images)), "auroc": auroc(in_scores, scores),
                      "fpr_at_95_tpr": fpr_at_95_tpr(in_scores, scores),
                      "median_error": float(np.median(scores))}
    return {"model": card["name"], "version": card.get("version"), "sha256": card["sha256"],
            "score": "reconstruction error: mean squared difference per pixel, pixels in [0, 1] (the graph's `error`)",
            "in_distribution": {"set": "fashion-mnist test", "images": int(len(in_images)),
                                "median_error": float(np.median(in_scores)),
                                "error_at_95_tpr": float(np.quantile(in_scores, 0.95))},
            "sets": rows, "mean_auroc": float(np.mean([r["auroc"] for r in rows.values()])),
            "command": "python -m benchmarks.ood_autoencoder"}


def markdown(result: dict) -> str:
    lines = [f"# Reconstruction error as an OOD score: `{result['model']}` ({result['version']})", "",
             f"Score: {result['score']}. In-distribution: {result['in_distribution']['images']:,} Fashion-MNIST test "
             f"images (median error {result['in_distribution']['median_error']:.4f}; 95% of them at most "
             f"{result['in_distribution']['error_at_95_tpr']:.4f}). Out-of-distribution sets from "
             "export/evaluate_ood.py's `ood_sets`, as for the classifiers' methods in [ood.md](ood.md). "
             f"Made by `{result['command']}`.", "",
             "| set | images | AUROC | FPR at 95% TPR | median error |", "|---|---:|---:|---:|---:|"]
    for name, row in result["sets"].items():
        lines.append(f"| {name} | {row['images']:,} | {row['auroc']:.4f} | {row['fpr_at_95_tpr']:.4f} | "
                     f"{row['median_error']:.4f} |")
    lines.append(f"| **mean** | | **{result['mean_auroc']:.4f}** | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/autoencoder")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, help="images per set (a quick check); default: all")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    result = evaluate(Path(args.model), args.data_dir, args.limit)
    write_results(args.out, "ood_autoencoder", result, markdown(result))
    return result


if __name__ == "__main__":
    main(parse_args())
