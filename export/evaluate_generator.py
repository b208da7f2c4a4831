"""Judge a generator with a released classifier: class consistency and a feature Frechet distance.

    python -m export.evaluate_generator --models models --judge models/resnet --out benchmarks/results

Everything runs on exported graphs in onnxruntime (generator and judge), each verified against its card:
- class consistency: the judge's accuracy on 10,000 generated images (1,000 per class) against the class
  asked for;
- feature FID: the Frechet distance between the judge's `embedding` of those 10,000 images and of the
  10,000 test images (a Gaussian fitted to each set of features, Heusel et al. 2017, in the judge's
  feature space rather than Inception's, which cannot be downloaded here and was never shown clothing);
- its floor: the same distance between 10,000 training images and the test images, i.e. what real
  data scores. Released generators must have consistency >= 90% and FID <= 3x the floor;
- a reference for that scale: the distance of the same training images mirrored (measured with the
  width-1 ResNet: 6.2x the floor, where a DCGAN after 5 epochs scored 156x).
Writes generator.json and generator.md into --out and exits 1 when a released generator misses a gate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import linalg

from export.onnx_io import run_batched, sha256_bytes
from training.data import load_dataset

CONSISTENCY_GATE = 0.90
FID_RATIO_GATE = 3.0
SAMPLES_PER_CLASS = 1000
EVAL_NOISE_SEED = 50_000_005   # the evaluation's own noise, never the training's or the service's seeds
FLOOR_SUBSET_SEED = 50_000_006  # which 10,000 training images stand in for "real data" in the floor


def verified_session(model_dir: Path) -> tuple[ort.InferenceSession, dict]:
    """A CPU session of model_dir/model.onnx after checking its SHA-256 against the card beside it."""
    card = json.loads((model_dir / "card.json").read_text())
    model_bytes = (model_dir / "model.onnx").read_bytes()
    if sha256_bytes(model_bytes) != card["sha256"]:
        raise SystemExit(f"{model_dir}/model.onnx does not match the sha256 in its card.json")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]), card


def evaluation_inputs(z_dim: int, num_classes: int, per_class: int, seed: int = EVAL_NOISE_SEED
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise and labels: `per_class` samples of every class, z ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return rng.standard_normal((len(labels), z_dim)).astype(np.float32), labels


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FID formula, in float64."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # nearly singular product: regularise, as the reference implementation does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real  # tiny imaginary parts are numerical noise
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def judge(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's probabilities and embedding of uint8 images [N, C, H, W]."""
    probabilities, embedding = run_batched(session, {"pixels": pixels}, batch_size=500)
    return probabilities, embedding


def generate(session: ort.InferenceSession, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    (pixels,) = run_batched(session, {"z": z, "label": labels}, batch_size=500)
    return pixels


def score_generator(generator: ort.InferenceSession, judge_session: ort.InferenceSession, z_dim: int,
                    label_names: list[str], test_images: np.ndarray, train_images: np.ndarray,
                    per_class: int = SAMPLES_PER_CLASS) -> dict:
    """Consistency (overall and per class), feature FID, its floor and their ratio."""
    z, labels = evaluation_inputs(z_dim, len(label_names), per_class)
    generated = generate(generator, z, labels)
    probabilities, generated_features = judge(judge_session, generated)
    predicted = probabilities.argmax(1)
    _, test_features = judge(judge_session, test_images)
    floor_size = min(len(train_images), len(test_images))
    subset = np.random.default_rng(FLOOR_SUBSET_SEED).choice(len(train_images), floor_size, replace=False)
    real = train_images[np.sort(subset)]
    _, train_features = judge(judge_session, real)
    fid = frechet_distance(generated_features, test_features)
    floor = frechet_distance(train_features, test_features)
    # A reference for the floor's scale: the same training images mirrored, real garments the judge was
    # trained on (mirrors included); no generator can be expected to beat it.
    _, mirrored_features = judge(judge_session, np.ascontiguousarray(real[..., ::-1]))
    mirrored = frechet_distance(mirrored_features, test_features)
    return {
        "samples": int(len(labels)),
        "class_consistency": float((predicted == labels).mean()),
        "per_class_consistency": {name: float((predicted[labels == k] == k).mean())
                                  for k, name in enumerate(label_names)},
        "feature_fid": fid,
        "feature_fid_floor": floor,
        "fid_to_floor_ratio": fid / floor,
        "reference_mirrored_train_fid": mirrored,
        "reference_mirrored_train_ratio": mirrored / floor,
        "real_images": {"test": int(len(test_images)), "train_subset": int(floor_size)},
    }


def gates(scores: dict) -> dict:
    return {"class_consistency": scores["class_consistency"] >= CONSISTENCY_GATE,
            "fid_to_floor_ratio": scores["fid_to_floor_ratio"] <= FID_RATIO_GATE}


def judge_generator(generator: ort.InferenceSession, judge_dir: Path, dataset: str, data_dir: str | None, z_dim: int,
                    label_names: list[str], per_class: int = SAMPLES_PER_CLASS) -> tuple[dict, dict]:
    """score_generator with the judge in judge_dir (checksum verified) and the dataset's real images;
    returns the scores and the judge's card. The exporter and this evaluator both go through here."""
    judge_session, judge_card = verified_session(judge_dir)
    test = load_dataset(dataset, "test", data_dir)
    train = load_dataset(dataset, "train", data_dir)
    scores = score_generator(generator, judge_session, z_dim, label_names, test.images.numpy(), train.images.numpy(),
                             per_class)
    return scores, judge_card


def evaluate_generator(model_dir: Path, judge_dir: Path, data_dir: str | None = None,
                       per_class: int = SAMPLES_PER_CLASS) -> dict:
    generator, card = verified_session(model_dir)
    scores, judge_card = judge_generator(generator, judge_dir, card["training"]["config"]["dataset"], data_dir,
                                         card["inputs"][0]["shape"][1], card["labels"], per_class)
    return {"name": card["name"], "version": card.get("version"), "sha256": card["sha256"],
            "judge": {"name": judge_card["name"], "version": judge_card.get("version"), "sha256": judge_card["sha256"]},
            **scores, "gates": gates(scores)}


def markdown_table(results: list[dict]) -> str:
    lines = [f"Gates: class consistency >= {CONSISTENCY_GATE:.0%}, feature FID <= {FID_RATIO_GATE:g}x its floor "
             "(training vs test images). Judge: the released classifier named below, by onnxruntime.", "",
             "| model | judge | samples | class consistency | feature FID | floor | ratio | mirrored real images: FID (ratio) | gates |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        passed = "pass" if all(r["gates"].values()) else "FAIL " + ", ".join(k for k, ok in r["gates"].items() if not ok)
        lines.append(f"| {r['name']} | {r['judge']['name']} | {r['samples']:,} | {r['class_consistency']:.2%} | "
                     f"{r['feature_fid']:.3f} | {r['feature_fid_floor']:.3f} | {r['fid_to_floor_ratio']:.2f} | "
                     f"{r['reference_mirrored_train_fid']:.3f} ({r['reference_mirrored_train_ratio']:.2f}) | {passed} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models", help="every folder in it whose card's task is generation")
    p.add_argument("--judge", default="models/resnet", help="the released classifier that judges the samples")
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST")
    p.add_argument("--per-class", type=int, default=SAMPLES_PER_CLASS)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    folders = sorted(p.parent for p in Path(args.models).glob("*/card.json")
                     if json.loads(p.read_text()).get("task") == "generation")
    results = [evaluate_generator(folder, Path(args.judge), args.data_dir, args.per_class) for folder in folders]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "generator.md").write_text(markdown_table(results))
    print(markdown_table(results), end="")
    if not all(all(r["gates"].values()) for r in results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(parse_args())
