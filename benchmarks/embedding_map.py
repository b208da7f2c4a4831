"""The embedding space, seen: 2-D maps (PCA, t-SNE) of each released classifier's test-set embeddings, and how well
k-means (k = 10) on them recovers the labels, beside raw pixels and the autoencoder's bottleneck.

    python -m benchmarks.embedding_map                  # or `make embedding-map`; a few minutes on 2 cores
    python -m benchmarks.embedding_map --sample 300 --models cnn --out /tmp/map   # seconds

For every classification card in models/ the ONNX graph's `embedding` output is computed by onnxruntime on a
seeded sample of the Fashion-MNIST test split (3,000 images by default: t-SNE is quadratic-ish, 10,000 would take
many minutes here), and so is the autoencoder's `code` output where models/autoencoder is released. Raw pixels
(784 values in [0, 1]) are the baseline. Each representation is drawn by PCA and by t-SNE (scikit-learn,
perplexity 30, PCA initialisation, seeded), coloured by the true class, and clustered by k-means with k = 10
(10 seeded restarts) on its standardised features; the table gives the adjusted Rand index and the normalised
mutual information of the clusters against the labels (1 = the classes exactly, 0 = chance).

The same analysis runs on scikit-learn's 8x8 digits (its fixed test split, training/data.py) for the lectures'
MLP (64-64 ReLU hidden layers, the penultimate layer as the embedding), trained here on the digits' training split
for --digits-epochs epochs (a second or two), beside the digits' raw pixels.

Writes OUT/<representation>-pca.png, OUT/<representation>-tsne.png, OUT/embedding_map.json and OUT/embedding_map.md,
and copies the default classifier's t-SNE map to service/static/embedding-map.png, which the web page's Models
section shows (a run that did not draw that classifier leaves the page's map as it was).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from training.data import load_dataset  # noqa: E402
from training.models import build_classifier  # noqa: E402

MODELS = Path("models")
OUT = Path("benchmarks/results/embedding_map")
SEED = 0
# The web page's map: the default classifier's (service/config.py DEFAULT_MODELS), served from service/static/.
WEB_MAP_SOURCE = "cnn-embedding-tsne.png"
WEB_MAP = Path("service/static/embedding-map.png")


def released(models_dir: Path, task: str) -> list[Path]:
    return [card.parent for card in sorted(models_dir.glob("*/card.json"))
            if json.loads(card.read_text()).get("task") == task]


def onnx_output(model_dir: Path, output: str, pixels: np.ndarray, batch_size: int = 500) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {"pixels": pixels[i:i + batch_size]})[0]
                           for i in range(0, len(pixels), batch_size)]).astype(np.float32)


def sample_rows(n: int, sample: int, seed: int = SEED) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[:min(sample, n)])


def project(features: np.ndarray, tsne_iterations: int = 1000, seed: int = SEED) -> dict[str, np.ndarray]:
    scaled = StandardScaler().fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return {"pca": PCA(n_components=2, random_state=seed).fit_transform(scaled),
            "tsne": TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                         max_iter=tsne_iterations).fit_transform(scaled)}


def cluster_scores(features: np.ndarray, labels: np.ndarray, k: int = 10, seed: int = SEED) -> dict:
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(StandardScaler().fit_transform(features))
    return {"ari": float(adjusted_rand_score(labels, clusters)), "nmi": float(normalized_mutual_info_score(labels, clusters))}


def plot_map(points: np.ndarray, labels: np.ndarray, label_names: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(label_names):
        chosen = labels == k
        ax.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.7, color=colours(k % 10), label=name)
    ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analyse(name: str, features: np.ndarray, labels: np.ndarray, label_names: list[str], out: Path,
            dataset: str, tsne_iterations: int = 1000) -> dict:
    started = time.perf_counter()
    maps = project(features, tsne_iterations)
    scores = cluster_scores(features, labels)
    for method, points in maps.items():
        plot_map(points, labels, label_names, out / f"{name}-{method}.png",
                 # two lines: one was wider than the axes and lost its start to the figure's edge
                 f"{dataset}: {name} ({features.shape[1]} dims, {len(features):,} images) by "
                 f"{'PCA' if method == 'pca' else 't-SNE'}\nk-means ARI {scores['ari']:.3f}, NMI {scores['nmi']:.3f}")
    row = {"dataset": dataset, "representation": name, "dims": int(features.shape[1]), "images": int(len(features)),
           **scores, "seconds": round(time.perf_counter() - started, 1),
           "pngs": [f"{name}-{method}.png" for method in maps]}
    print(f"{dataset} {name}: {features.shape[1]} dims, ARI {scores['ari']:.3f}, NMI {scores['nmi']:.3f} "
          f"({row['seconds']}s)", flush=True)
    return row


def train_digits_mlp(epochs: int, seed: int = SEED) -> tuple[torch.nn.Module, dict]:
    """The lectures' MLP on the 8x8 digits' training split: Adam, full-batch-ish (64), seeded."""
    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model, _ = build_classifier("mlp", init="kaiming-normal", in_shape=(1, 8, 8), num_classes=10,
                                activation="relu", hidden=[64, 64], dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.images.float() / 255.0, train.labels
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, {"train_images": len(x), "epochs": epochs}


def digits_rows(out: Path, epochs: int, sample: int, tsne_iterations: int) -> list[dict]:
    test = load_dataset("digits", "test")
    rows = sample_rows(len(test), sample)
    images, labels = test.images[rows], test.labels[rows].numpy()
    model, info = train_digits_mlp(epochs)
    with torch.no_grad():
        x = images.float() / 255.0
        accuracy = float((model(x).argmax(1).numpy() == labels).mean())
        embedding = model.forward_features(x).numpy()
    names = test.label_names
    mlp = analyse("digits-mlp-embedding", embedding, labels, names, out, "sklearn 8x8 digits (test split)",
                  tsne_iterations)
    mlp["note"] = f"MLP 64-64 ReLU, {info['epochs']} epochs on {info['train_images']} images; test accuracy {accuracy:.3f}"
    raw = analyse("digits-raw-pixels", x.flatten(1).numpy(), labels, names, out, "sklearn 8x8 digits (test split)",
                  tsne_iterations)
    return [mlp, raw]


def markdown(result: dict) -> str:
    lines = ["# The embedding space: k-means (k = 10) against the labels", "",
             f"Made by `{result['command']}` ({result['seconds']:.0f} s). Each representation of a seeded sample of "
             "test images is standardised and clustered by k-means (10 restarts, seed 0); ARI: adjusted Rand index, "
             "NMI: normalised mutual information of clusters vs true classes (1 = the classes, 0 = chance). Maps: "
             "`<representation>-pca.png` and `<representation>-tsne.png` beside this file.", "",
             "| data | representation | dims | images | ARI | NMI | maps |", "|---|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        maps = " ".join(f"[{png.rsplit('-', 1)[1][:-4]}]({png})" for png in row["pngs"])
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['dataset']} | {row['representation']}{note} | {row['dims']} | {row['images']:,} | "
                     f"{row['ari']:.3f} | {row['nmi']:.3f} | {maps} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(MODELS))
    p.add_argument("--models", nargs="+", help="classifier names (default: every released classifier)")
    p.add_argument("--sample", type=int, default=3000, help="test images per map (seeded)")
    p.add_argument("--digits-epochs", type=int, default=60)
    p.add_argument("--tsne-iterations", type=int, default=1000, help="t-SNE optimisation steps (>= 250)")
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--only", nargs="+", choices=["classifiers", "raw", "autoencoder", "digits"],
                   help="compute only these representations (default: all)")
    p.add_argument("--append", action="store_true",
                   help="keep OUT/embedding_map.json's other rows, replacing those computed now (same sample and seed)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir)
    test = load_dataset("fashion-mnist" if args.data_dir is None else "idx", "test", args.data_dir)
    rows_index = sample_rows(len(test), args.sample)
    pixels, labels, names = test.images.numpy()[rows_index], test.labels.numpy()[rows_index], test.label_names
    dataset = "Fashion-MNIST test"
    rows = []
    only = set(args.only or ["classifiers", "raw", "autoencoder", "digits"])
    classifiers = released(models_dir, "classification") if "classifiers" in only else []
    if args.models:
        classifiers = [d for d in classifiers if d.name in args.models]
    for model_dir in classifiers:
        rows.append(analyse(f"{model_dir.name}-embedding", onnx_output(model_dir, "embedding", pixels), labels, names,
                            out, dataset, args.tsne_iterations))
    if "raw" in only:
        rows.append(analyse("raw-pixels", pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0, labels, names,
                            out, dataset, args.tsne_iterations))
    for model_dir in (released(models_dir, "reconstruction") if "autoencoder" in only else []):
        rows.append(analyse(f"{model_dir.name}-bottleneck", onnx_output(model_dir, "code", pixels), labels, names,
                            out, dataset, args.tsne_iterations))
    if "digits" in only:
        rows.extend(digits_rows(out, args.digits_epochs, args.sample, args.tsne_iterations))
    command = "python -m benchmarks.embedding_map" + (f" --sample {args.sample}" if args.sample != 3000 else "")
    if args.only:
        command += " --only " + " ".join(args.only) + (" --append" if args.append else "")
    seconds = time.perf_counter() - started
    commands = [command]
    previous = out / "embedding_map.json"
    if args.append and previous.is_file():
        earlier = json.loads(previous.read_text())
        if earlier["sample"] != args.sample:
            raise SystemExit(f"{previous} has a sample of {earlier['sample']}, not {args.sample}: not comparable")
        now = {row["representation"] for row in rows}
        rows = [row for row in earlier["rows"] if row["representation"] not in now] + rows
        commands = earlier.get("commands", [earlier["command"]]) + commands
        seconds += earlier["seconds"]
    result = {"command": " && ".join(commands), "commands": commands, "seconds": seconds, "sample": args.sample,
              "seed": SEED, "rows": rows}
    (out / "embedding_map.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "embedding_map.md").write_text(markdown(result))
    if out == OUT and WEB_MAP_SOURCE in {png for row in rows for png in row["pngs"]}:
        shutil.copyfile(out / WEB_MAP_SOURCE, WEB_MAP)
    return result


if __name__ == "__main__":
    main(parse_args())
