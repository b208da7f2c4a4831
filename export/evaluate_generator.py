"""Judge a generator on one fixed, named network's features, against real images as the reference.

    python -m export.evaluate_generator --models models --features models/cnn --judge models/resnet

Everything runs on exported graphs in onnxruntime, each verified against its card. The generator draws
10,000 samples, 1,000 per class, from fixed noise (each class its own stream, so 100 per class is a prefix
of 1,000). Their features are the released CNN's `embedding` output (128 dimensions, one view, no test-time
augmentation), the same network every time so that figures compare across runs and releases (Inception,
FID's usual network, cannot be downloaded here and was never shown clothing). Against the 10,000 test images:
- FID (Heusel et al. 2017), the Frechet distance of Gaussians fitted to both feature sets; per class too;
- KID (Binkowski et al. 2018), the unbiased squared MMD with the cubic polynomial kernel, mean and standard
  deviation over 100 random subsets of 1,000 from each side;
- precision and recall (Kynkaenniemi et al. 2019, k = 3): the share of samples inside the real images'
  k-nearest-neighbour manifold, and the share of real images inside the samples' manifold;
- class consistency: the released ResNet's accuracy on the samples against the class asked for.
The reference is what a perfect generator would reach: the same figures for 10,000 *training* images (a
fixed random subset) against the test images. `fid_to_reference` = FID / the reference's FID (goal <= 2).
Goals and floors are export/release.py's; writes generator.json, generator.md and generator_samples.png
(10 samples per class beside 10 real test images) into --out, and exits 1 only below a floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import linalg

from export.onnx_io import model_dirs_for, run_batched, verified_session
from export.release import GENERATOR_TARGETS, floor_problems, release_block
from training.data import load_dataset

SAMPLES_PER_CLASS = 1000
CHECK_PER_CLASS = 100          # the prefix of each class's samples whose consistency the card also records (tests re-judge it)
EVAL_NOISE_SEED = 50_000_005   # the evaluation's own noise, never the training's or the service's seeds
REFERENCE_SUBSET_SEED = 50_000_006  # which 10,000 training images play the perfect generator
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 50_000_008
NEAREST_K = 3                  # Kynkaenniemi et al.'s k for precision and recall


def evaluation_inputs(z_dim: int, num_classes: int, per_class: int, seed: int = EVAL_NOISE_SEED
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise and labels: `per_class` samples of every class, z ~ N(0, I), class by class. Each class draws
    from its own stream, so the first n samples of a class are the same whatever `per_class` is."""
    z = np.concatenate([np.random.default_rng([seed, k]).standard_normal((per_class, z_dim))
                        for k in range(num_classes)]).astype(np.float32)
    return z, np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FID formula, in float64."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # The CNN's ReLU features have dead dimensions (15 of 128 are zero on every test image), so these
        # covariances are singular and scipy warns on each call; the root is still what FID's reference takes.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # nearly singular product: regularise, as the reference implementation does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real  # tiny imaginary parts are numerical noise
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over random subsets; (mean, std) over subsets."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    d, m = a.shape[1], min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def nearest_radii(features: np.ndarray, k: int = NEAREST_K, chunk: int = 1000) -> np.ndarray:
    """Squared distance from every point to its k-th nearest other point of the same set."""
    radii = np.empty(len(features), dtype=features.dtype)
    for start in range(0, len(features), chunk):
        block = squared_distances(features[start:start + chunk], features)
        radii[start:start + chunk] = np.partition(block, k, axis=1)[:, k]  # column 0 is the point itself
    return radii


def covered(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """For each query: does it fall inside some point's k-NN ball (the points' estimated manifold)?"""
    return np.concatenate([(squared_distances(queries[s:s + chunk], points) <= radii[None, :]).any(1)
                           for s in range(0, len(queries), chunk)])


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEAREST_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019): samples on the real manifold, and real
    images on the samples' manifold, each manifold the union of k-nearest-neighbour balls."""
    # float32 distances: both sides of every comparison are computed the same way, and it halves the time.
    real, generated = real.astype(np.float32), generated.astype(np.float32)
    precision = covered(generated, real, nearest_radii(real, k)).mean()
    recall = covered(real, generated, nearest_radii(generated, k)).mean()
    return float(precision), float(recall)


def feature_figures(candidate: np.ndarray, candidate_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                    label_names: list[str]) -> dict:
    """FID, KID, precision, recall and per-class FID of one feature set against the test images' features."""
    kid_mean, kid_std = kernel_distance(candidate, test)
    precision, recall = precision_recall(test, candidate)
    return {"fid": frechet_distance(candidate, test), "kid_mean": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall,
            "per_class_fid": {name: frechet_distance(candidate[candidate_labels == k], test[test_labels == k])
                              for k, name in enumerate(label_names)}}


def embed(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    """The feature network's `embedding` of uint8 images [N, C, H, W]."""
    return np.concatenate([session.run(["embedding"], {"pixels": pixels[i:i + 500]})[0]
                           for i in range(0, len(pixels), 500)])


def judge_classes(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    """The judge's predicted class of uint8 images [N, C, H, W]."""
    return np.concatenate([session.run(["probabilities"], {"pixels": pixels[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(pixels), 500)])


def generate(session: ort.InferenceSession, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    (pixels,) = run_batched(session, {"z": z, "label": labels}, batch_size=500)
    return pixels


def reference_images(train_images: np.ndarray, train_labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed random subset of training images that plays a perfect generator."""
    subset = np.sort(np.random.default_rng(REFERENCE_SUBSET_SEED).choice(len(train_images), size, replace=False))
    return train_images[subset], train_labels[subset]


def score_generator(generator: ort.InferenceSession, features: ort.InferenceSession, judge: ort.InferenceSession,
                    z_dim: int, label_names: list[str], test: tuple[np.ndarray, np.ndarray],
                    train: tuple[np.ndarray, np.ndarray], per_class: int = SAMPLES_PER_CLASS,
                    judge_per_class: int | None = None) -> dict:
    """Every figure of the module docstring, for the samples and for the training-images reference.

    judge_per_class: judge only the first n samples of each class (the figures in features are unchanged)."""
    z, labels = evaluation_inputs(z_dim, len(label_names), per_class)
    generated = generate(generator, z, labels)
    test_images, test_labels = test
    real_images, real_labels = reference_images(*train, min(len(train[0]), len(test_images)))
    test_features = embed(features, test_images)
    samples = feature_figures(embed(features, generated), labels, test_features, test_labels, label_names)
    reference = feature_figures(embed(features, real_images), real_labels, test_features, test_labels, label_names)

    judged_per_class = min(judge_per_class or per_class, per_class)
    judged = (np.arange(len(labels)) % per_class) < judged_per_class
    predicted = judge_classes(judge, generated[judged])
    asked = labels[judged]
    check = judged & ((np.arange(len(labels)) % per_class) < CHECK_PER_CLASS)
    return {
        "samples": int(len(labels)), "judged_samples": int(judged.sum()),
        "class_consistency": float((predicted == asked).mean()),
        "per_class_consistency": {name: float((predicted[asked == k] == k).mean()) for k, name in enumerate(label_names)},
        "check": {"per_class": CHECK_PER_CLASS,
                  "class_consistency": float((predicted[check[judged]] == asked[check[judged]]).mean())},
        **samples,
        "fid_to_reference": samples["fid"] / reference["fid"],
        "reference": {"what": f"{len(real_images):,} training images (a fixed random subset) against the "
                              f"{len(test_images):,} test images: what a perfect generator would score", **reference},
        "real_images": {"test": int(len(test_images)), "train_subset": int(len(real_images))},
    }


def network_record(card: dict) -> dict:
    return {"name": card["name"], "version": card.get("version"), "sha256": card["sha256"],
            "test_accuracy": card["metrics"]["accuracy"]}


def judge_generator(generator: ort.InferenceSession, features_dir: Path, judge_dir: Path, dataset: str,
                    data_dir: str | None, z_dim: int, label_names: list[str], per_class: int = SAMPLES_PER_CLASS,
                    judge_per_class: int | None = None) -> dict:
    """score_generator with the feature network and the judge from their folders (checksums verified) and the
    dataset's real images, plus which networks measured. The exporter and this evaluator both go through here."""
    feature_session, feature_card = verified_session(features_dir)
    judge_session, judge_card = verified_session(judge_dir)
    test = load_dataset(dataset, "test", data_dir)
    train = load_dataset(dataset, "train", data_dir)
    scores = score_generator(generator, feature_session, judge_session, z_dim, label_names,
                             (test.images.numpy(), test.labels.numpy()), (train.images.numpy(), train.labels.numpy()),
                             per_class, judge_per_class)
    return {**scores, "features": {**network_record(feature_card), "output": "embedding", "views": 1},
            "judge": network_record(judge_card)}


def evaluate_generator(model_dir: Path, features_dir: Path, judge_dir: Path, data_dir: str | None = None,
                       per_class: int = SAMPLES_PER_CLASS, judge_per_class: int | None = None) -> dict:
    generator, card = verified_session(model_dir)
    scores = judge_generator(generator, features_dir, judge_dir, card["training"]["config"]["dataset"], data_dir,
                             card["inputs"][0]["shape"][1], card["labels"], per_class, judge_per_class)
    result = {"name": card["name"], "version": card.get("version"), "sha256": card["sha256"], **scores}
    result["release"] = release_block(GENERATOR_TARGETS, result)
    result["problems"] = floor_problems(GENERATOR_TARGETS, result)
    return result


def comparison_grid(generator: ort.InferenceSession, z_dim: int, test_images: np.ndarray, test_labels: np.ndarray,
                    num_classes: int, per_row: int = 10) -> np.ndarray:
    """uint8 [num_classes * (2 * per_row + 1), 1, H, W]: per class, `per_row` samples (the evaluation's first
    noise vectors), a blank, then the first `per_row` test images of that class."""
    z, labels = evaluation_inputs(z_dim, num_classes, per_row)
    samples = generate(generator, z, labels)
    blank = np.zeros_like(samples[:1])
    rows = [np.concatenate([samples[labels == k], blank, test_images[test_labels == k][:per_row]])
            for k in range(num_classes)]
    return np.concatenate(rows)


def markdown_table(results: list[dict]) -> str:
    lines = ["Features: the released CNN's `embedding` (one view), 10,000 samples (1,000 per class) against the 10,000 "
             "test images; reference: 10,000 training images against the same test images. Consistency: the "
             "released ResNet's top-1 against the class asked for. Goals and floors: export/release.py.", "",
             "| model | samples | FID | reference FID | FID / reference | KID x 1000 (reference) | precision (reference) "
             "| recall (reference) | class consistency | figures / goals (floors) | checks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        ref = r["reference"]
        checks = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(f"| {r['name']} | {r['samples']:,} | {r['fid']:.3f} | {ref['fid']:.3f} | {r['fid_to_reference']:.2f} | "
                     f"{1000 * r['kid_mean']:.3f} ± {1000 * r['kid_std']:.3f} ({1000 * ref['kid_mean']:.3f} ± "
                     f"{1000 * ref['kid_std']:.3f}) | {r['precision']:.3f} ({ref['precision']:.3f}) | {r['recall']:.3f} "
                     f"({ref['recall']:.3f}) | {r['class_consistency']:.2%} | {r['release']['summary']} | {checks} |")
    for r in results:
        lines += ["", f"{r['name']}, per class: FID (reference FID), consistency", "",
                  "| class | FID | reference | consistency |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {fid:.3f} | {r['reference']['per_class_fid'][name]:.3f} | "
                  f"{r['per_class_consistency'][name]:.2%} |" for name, fid in r["per_class_fid"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models", help="every folder in it whose card's task is generation")
    p.add_argument("--features", default="models/cnn", help="the released classifier whose embedding is the feature space")
    p.add_argument("--judge", default="models/resnet", help="the released classifier that judges class consistency")
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST")
    p.add_argument("--per-class", type=int, default=SAMPLES_PER_CLASS)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    from training.plots import save_image_grid

    folders = model_dirs_for(args.models, "generation")
    results = [evaluate_generator(folder, Path(args.features), Path(args.judge), args.data_dir, args.per_class)
               for folder in folders]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (out / "generator.md").write_text("Measured by `python -m export.evaluate_generator` (`make evaluate`).\n\n" + table)
    print(table, end="")
    if folders:
        generator, card = verified_session(folders[0])
        test = load_dataset(card["training"]["config"]["dataset"], "test", args.data_dir)
        grid = comparison_grid(generator, card["inputs"][0]["shape"][1], test.images.numpy(), test.labels.numpy(),
                               len(card["labels"]))
        save_image_grid(grid, out / "generator_samples.png", columns=21, row_labels=card["labels"],
                        title=f"{card['name']} {card.get('version')}: 10 samples per class (left) beside 10 test images")
    if any(r["problems"] for r in results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(parse_args())
