"""FP16 variants of the released classifiers and segmenter: the graphs the CUDA provider runs faster (half the
bytes per weight and activation, tensor cores), checked against their FP32 originals before they are written.

    python -m export.fp16 --model models/cnn models/resnet-student models/segnet   # what `make fp16` runs

Each variant keeps the contract's inputs and outputs (uint8 pixels in; float32 probabilities / embeddings, uint8
masks out: `keep_io_types`), so a client cannot tell which graph answered. It is written beside model.onnx as
`model-fp16.onnx` and named in the card's `features.fp16` section with its sha256, which the model store copies
and the server verifies like every feature file; `VISIONSERVE_PRECISION` chooses it (docs/SERVING.md).

The parity check runs both graphs in onnxruntime on the full test split (classifiers: 10,000 Fashion-MNIST test
images; segmenter: the fixed test scenes) and records the accuracy (or mIoU) delta in points, the share of equal
answers and the largest probability difference. It runs on the CPU provider here, whose FP16 kernels round like
any IEEE half-precision unit; a CUDA machine's figures come from `make gpu-check`. A variant whose accuracy falls
more than MAX_DELTA_POINTS below FP32 is not written: it would be a broken model, not a faster one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.onnx_io import cpu_session, run_batched, sha256_bytes
from training.data import load_dataset
from training.metrics import iou_scores
from training.scenes import TEST_SCENE_SEED, TEST_SCENES, fixed_test_scenes

VARIANT_FILE = "model-fp16.onnx"
# Past this loss the variant is refused; measured deltas are far below (benchmarks/results/fp16.md).
MAX_DELTA_POINTS = 0.3
# Kept in float32: the in-graph normalisation's first Sub/Div see uint8 values 0-255 cast to float, exact in fp16
# too, so nothing is blocked for that; MaxUnpool has no float16 kernel in onnxruntime (CPU or CUDA), and a
# float16 MaxUnpool would make the segmenter's graph unrunnable.
BLOCKED_OPS = ["MaxUnpool"]


def to_fp16(model_path: Path) -> bytes:
    """The float16 graph of a float32 ONNX file, its inputs and outputs kept in their original types."""
    model = onnx.load(str(model_path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=BLOCKED_OPS)
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def first_output(session: ort.InferenceSession, name: str, images: np.ndarray, batch_size: int) -> np.ndarray:
    outputs = run_batched(session, {"pixels": images}, batch_size=batch_size)
    return outputs[[output.name for output in session.get_outputs()].index(name)]


def classifier_parity(fp32: ort.InferenceSession, fp16: ort.InferenceSession, images: np.ndarray,
                      labels: np.ndarray) -> dict:
    """Accuracy of both graphs on the same images, the share of equal top-1 answers and the largest difference."""
    reference, half = (first_output(session, "probabilities", images, 500) for session in (fp32, fp16))
    accuracy_fp32 = float(np.mean(reference.argmax(1) == labels))
    accuracy_fp16 = float(np.mean(half.argmax(1) == labels))
    return {"images": int(len(images)), "accuracy_fp32": accuracy_fp32, "accuracy_fp16": accuracy_fp16,
            "delta_points": round(100 * (accuracy_fp16 - accuracy_fp32), 4),
            "top1_agreement": float(np.mean(reference.argmax(1) == half.argmax(1))),
            "max_abs_probability_difference": float(np.abs(reference - half).max())}


def segmenter_parity(fp32: ort.InferenceSession, fp16: ort.InferenceSession, card: dict,
                     data_dir: str | None = None) -> dict:
    """mIoU of both graphs on the released fixed test scenes, and the share of pixels given the same class."""
    height, width = card["input"]["trained_height"], card["input"]["trained_width"]
    scenes = fixed_test_scenes(TEST_SCENES, TEST_SCENE_SEED, height, width, data_dir=data_dir)
    images, truth = scenes.images.numpy(), scenes.masks.numpy()
    reference, half = (first_output(session, "mask", images, 50) for session in (fp32, fp16))
    miou_fp32 = iou_scores(truth, reference, len(card["labels"]))[1]
    miou_fp16 = iou_scores(truth, half, len(card["labels"]))[1]
    return {"scenes": int(len(images)), "miou_fp32": miou_fp32, "miou_fp16": miou_fp16,
            "delta_points": round(100 * (miou_fp16 - miou_fp32), 4),
            "pixel_agreement": float(np.mean(reference == half))}


def make_variant(model_dir: Path, data_dir: str | None = None, first_images: int | None = None,
                 max_delta_points: float = MAX_DELTA_POINTS) -> dict:
    """Convert, check and (when it passes) write one model folder's FP16 variant; returns its card section."""
    card = json.loads((model_dir / "card.json").read_text())
    fp16_bytes = to_fp16(model_dir / "model.onnx")
    fp32, fp16 = cpu_session((model_dir / "model.onnx").read_bytes()), cpu_session(fp16_bytes)
    if card["task"] == "classification":
        test = load_dataset(card["metrics"].get("dataset", "fashion-mnist"), "test", data_dir)
        parity = classifier_parity(fp32, fp16, test.images.numpy()[:first_images], test.labels.numpy()[:first_images])
    elif card["task"] == "segmentation":
        parity = segmenter_parity(fp32, fp16, card, data_dir)
    else:
        raise ValueError(f"{model_dir}: no FP16 variant for task {card['task']!r} (classifiers and segmenters only)")
    section = {"file": VARIANT_FILE, "sha256": sha256_bytes(fp16_bytes), "file_bytes": len(fp16_bytes),
               "precision": "float16 weights and activations; inputs and outputs as the FP32 graph's",
               "kept_float32_ops": BLOCKED_OPS, "parity": parity,
               "measured_by": f"onnxruntime {ort.__version__} CPUExecutionProvider, both graphs on the same inputs",
               "command": f"python -m export.fp16 --model {model_dir}"}
    section["released"] = parity["delta_points"] >= -max_delta_points
    if section["released"] and first_images is None:
        (model_dir / VARIANT_FILE).write_bytes(fp16_bytes)
        card.setdefault("features", {})["fp16"] = section
        (model_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return {"name": card["name"], "task": card["task"], **section}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | task | FP32 | FP16 | delta (points) | equal answers | max prob diff | FP16 file | released |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p = r["parity"]
        classification = r["task"] == "classification"
        before, after = (p["accuracy_fp32"], p["accuracy_fp16"]) if classification else (p["miou_fp32"], p["miou_fp16"])
        agreement = p["top1_agreement"] if classification else p["pixel_agreement"]
        largest = f"{p['max_abs_probability_difference']:.2e}" if classification else "-"
        released = "yes" if r["released"] else "no"
        lines.append(f"| {r['name']} | {r['task']} | {before:.4f} | {after:.4f} | {p['delta_points']:+.2f} | "
                     f"{agreement:.4%} | {largest} | {r['file_bytes'] / 1e6:.1f} MB | {released} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", type=Path, required=True, help="released model folders (models/<name>)")
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST location")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="fp16.json and fp16.md go here")
    p.add_argument("--first-images", type=int, help="check classifiers on the first N test images and write "
                   "nothing to the model folders (a quick run; the released figures use the whole split)")
    p.add_argument("--max-delta", type=float, default=MAX_DELTA_POINTS,
                   help="largest accuracy (mIoU) loss in points for which a variant is written")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    rows = [make_variant(folder, args.data_dir, args.first_images, args.max_delta) for folder in args.model]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp16.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(rows)
    (args.out / "fp16.md").write_text("# FP16 variants against FP32 (`make fp16`)\n\n" + table)
    print(table)
    return rows


if __name__ == "__main__":
    main(parse_args())
