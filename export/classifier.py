"""Export a trained classifier run to models/<name>/{model.onnx, card.json} behind a parity gate.
`python -m export.classifier` reads as "export the classifier"; the network itself is defined in training/models/.

    python -m export.classifier --run runs/cnn/<stamp> --name cnn
    python -m export.classifier --run runs/resnet/<stamp1> runs/resnet/<stamp2> --name resnet   # an ensemble

The graph is the whole model: uint8 pixels [N,C,H,W] -> normalisation -> network -> softmax, with outputs
`probabilities` [N,K] and `embedding` [N,D], and for one network ending in global average pooling (the
ResNet) `cam` [N,K,h,w], its class activation maps (service/explain.py; --no-cam leaves them out). Before
anything is written the graph must pass onnx.checker and agree with PyTorch on real test images (same argmax everywhere, probabilities within --tolerance);
the card's metrics are then measured by onnxruntime on the exported graph over the whole test split.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_io import (ParityError, cpu_session, export_block, export_command, export_to_bytes, opset_of,
                            run_batched, sha256_bytes, with_command, write_unless_dry_run)
from export.release import classifier_targets, release_block
from training.data import load_dataset, train_val_split
from training.models import build_classifier, count_parameters
from training.plots import confusion_matrix, plot_confusion, plot_curves
from training.train_classifier import command_for, split_seed


# Test-time augmentation: the views of each image whose probabilities (and embeddings) the graph averages.
# Only transformations the model was trained with: horizontal mirrors, and one-pixel shifts (zero fill).
TTA_VIEWS = {
    "none": [(0, 0, False)],
    "flip": [(0, 0, False), (0, 0, True)],
    "flip-shift": [(dy, dx, flip) for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)) for flip in (False, True)],
}
TTA_DESCRIPTIONS = {
    "none": "none",
    "flip": "mean of the image and its horizontal mirror (2 passes)",
    "flip-shift": "mean over the image and its one-pixel shifts up, down, left and right, each also mirrored "
                  "(10 passes)",
}


class ClassifierGraph(nn.Module):
    """Raw uint8 pixels in, probabilities and penultimate features out: no preprocessing outside the graph.

    With several members (an ensemble of runs that share one normalisation and one validation split) the
    probabilities are the members' mean and the embedding is their features side by side: each member's
    feature space is its own, so averaging features across members would mix unrelated coordinates.
    """

    def __init__(self, models: list[nn.Module], mean: list[float], std: list[float], tta: str = "none"):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.tta = tta
        self.with_cam = False  # set by main() where supports_cam(): a third output, `cam`
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def embedding_dim(self) -> int:
        return sum(member.embedding_dim for member in self.members)

    def supports_cam(self) -> bool:
        """Class activation maps (Zhou et al. 2016) need one network ending in global average pooling then one
        linear layer (the ResNet), and views that map back onto the input exactly (no shifts: a one-pixel shift of
        the input is a quarter cell of the 7x7 map). An ensemble's members each have their own feature space."""
        if len(self.members) != 1 or self.tta == "flip-shift":
            return False
        member = self.members[0]
        pool = getattr(member, "pool", None)
        return (all(hasattr(member, name) for name in ("stem", "blocks", "classifier"))
                and isinstance(pool, nn.Sequential) and isinstance(pool[0], nn.AdaptiveAvgPool2d)
                and isinstance(member.classifier, nn.Linear))

    def class_activation_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One normalised view -> (probabilities, features, cam [N, K, h, w]): cam_k = sum_c W_kc F_c + b_k over
        the last feature maps F, so the mean of cam_k over its cells is exactly class k's logit."""
        member = self.members[0]
        maps = member.blocks(member.stem(x))  # 64w x H/4 x W/4
        features = member.pool(maps)
        logits = member.classifier(features)
        weight = member.classifier.weight[:, :, None, None]  # K x 64w x 1 x 1
        cam = nn.functional.conv2d(maps, weight, member.classifier.bias)
        return torch.softmax(logits, dim=1), features, cam

    def forward_with_cam(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward's two outputs and the views' mean class activation maps, each view's map mirrored back."""
        raw = pixels.to(torch.float32)
        views = TTA_VIEWS[self.tta]
        probabilities = features = cam = None
        for dy, dx, flip in views:
            p, f, c = self.class_activation_maps(self.normalised_view(raw, None, dy, dx, flip))
            c = torch.flip(c, dims=[3]) if flip else c
            probabilities = p if probabilities is None else probabilities + p
            features = f if features is None else features + f
            cam = c if cam is None else cam + c
        return probabilities / len(views), features / len(views), cam / len(views)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_cam:
            return self.forward_with_cam(pixels)
        # Test-time augmentation lives inside the graph so that every client gets it and no preprocessing
        # is written twice. Views are cut from the raw pixels padded with the background value 0.
        raw = pixels.to(torch.float32)
        padded = nn.functional.pad(raw, (1, 1, 1, 1)) if self.tta == "flip-shift" else None
        probabilities = None
        features = [None] * len(self.members)
        views = TTA_VIEWS[self.tta]
        for dy, dx, flip in views:
            x = self.normalised_view(raw, padded, dy, dx, flip)
            for k, member in enumerate(self.members):
                f = member.forward_features(x)
                p = torch.softmax(member.classifier(f), dim=1)
                probabilities = p if probabilities is None else probabilities + p
                features[k] = f if features[k] is None else features[k] + f
        embedding = torch.cat(features, dim=1) if len(features) > 1 else features[0]
        return probabilities / (len(views) * len(self.members)), embedding / len(views)

    def normalised_view(self, raw: torch.Tensor, padded: torch.Tensor | None, dy: int, dx: int,
                        flip: bool) -> torch.Tensor:
        """One view of float pixels `raw`, cut from `padded` (raw with a one-pixel border of 0; None when no
        view is shifted), mirrored if asked, normalised as training.data.normalise does."""
        height, width = raw.shape[2], raw.shape[3]
        view = raw if padded is None else padded[:, :, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        if flip:
            view = torch.flip(view, dims=[3])
        return (view / 255.0 - self.mean) / self.std

    def view_probabilities(self, pixels: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
        """The members' mean probabilities for one view (a TTA_VIEWS entry), cut as forward cuts it."""
        raw = pixels.to(torch.float32)
        padded = nn.functional.pad(raw, (1, 1, 1, 1)) if dy or dx else None
        x = self.normalised_view(raw, padded, dy, dx, flip)
        return sum(torch.softmax(m.classifier(m.forward_features(x)), dim=1) for m in self.members) / len(self.members)


@dataclass
class Run:
    """One training run as the exporter needs it: its best weights, its config record and its metrics."""
    path: Path
    best: dict
    record: dict
    metrics: dict


def read_run(run_dir: Path) -> tuple[nn.Module, Run]:
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    model, _ = build_classifier(best["model_name"], **best["model_config"])
    model.load_state_dict(best["model"])
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    record = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return model, Run(run_dir, best, record, metrics)


def check_ensemble_compatible(runs: list[Run]) -> None:
    """Members must see the same inputs the same way and share a validation split that none trained on,
    or the ensemble's validation scores (and so the choice of views) would be contaminated."""
    first = runs[0]
    for run in runs[1:]:
        for what, get in (("data set", lambda r: (r.record["config"]["dataset"], r.record["config"]["data_dir"])),
                          ("data files", lambda r: r.record["data_files"]),
                          ("validation split", lambda r: (r.record["config"]["val_fraction"],
                                                          split_seed(r.record["config"]))),
                          ("normalisation", lambda r: r.record["normalisation"]),
                          ("labels", lambda r: r.record["label_names"]),
                          ("input shape", lambda r: r.record["model_config"]["in_shape"])):
            if get(run) != get(first):
                raise ValueError(f"{run.path} and {first.path} differ in {what}: they cannot be one ensemble "
                                 "(train ensemble members with one --split-seed)")


def load_runs(run_dirs: list[Path], tta: str = "none") -> tuple[ClassifierGraph, list[Run]]:
    models, runs = zip(*(read_run(Path(d)) for d in run_dirs))
    check_ensemble_compatible(list(runs))
    norm = runs[0].record["normalisation"]
    return ClassifierGraph(list(models), norm["mean"], norm["std"], tta).eval(), list(runs)


def load_run(run_dir: Path, tta: str = "none") -> tuple[ClassifierGraph, dict, dict, dict]:
    graph, (run,) = load_runs([run_dir], tta)
    return graph, run.best, run.record, run.metrics


@torch.no_grad()
def validation_accuracy_by_tta(graph: ClassifierGraph, config: dict) -> dict[str, float]:
    """PyTorch accuracy of each test-time augmentation on the run's own validation split (never the test
    split), so that the choice of views is made where the model was selected. Every TTA_VIEWS entry uses
    views of the largest one, so each distinct view runs once (10 passes per member, not 13)."""
    full = load_dataset(config["dataset"], "train", config["data_dir"])
    _, val = train_val_split(full, config["val_fraction"], split_seed(config))
    views = sorted({view for entry in TTA_VIEWS.values() for view in entry})
    correct = dict.fromkeys(TTA_VIEWS, 0)
    for i in range(0, len(val), 1000):  # under @torch.no_grad()
        images, labels = val.images[i:i + 1000], val.labels[i:i + 1000]
        by_view = {view: graph.view_probabilities(images, *view) for view in views}
        for tta, entry in TTA_VIEWS.items():
            correct[tta] += int((sum(by_view[view] for view in entry).argmax(1) == labels).sum())
    return {tta: count / len(val) for tta, count in correct.items()}


# CAM cells are logits (magnitudes up to ~20): compared relative to the largest cell of the batch.
CAM_RELATIVE_TOLERANCE = 1e-4


def check_parity(graph: ClassifierGraph, session, images: np.ndarray, tolerance: float) -> dict:
    with torch.no_grad():
        torch_out = [t.numpy() for t in graph(torch.from_numpy(images))]
    ort_out = run_batched(session, {"pixels": images})
    (torch_probs, torch_emb), (ort_probs, ort_emb) = torch_out[:2], ort_out[:2]
    agreement = float((torch_probs.argmax(1) == ort_probs.argmax(1)).mean())
    max_prob_diff = float(np.abs(torch_probs - ort_probs).max())
    report = {"images": int(len(images)), "argmax_agreement": agreement, "max_abs_probability_diff": max_prob_diff,
              "max_abs_embedding_diff": float(np.abs(torch_emb - ort_emb).max()), "tolerance": tolerance}
    if agreement < 1.0 or max_prob_diff > tolerance:
        raise ParityError(f"onnxruntime disagrees with PyTorch: {report}")
    if len(torch_out) == 3:
        scale = float(np.abs(torch_out[2]).max())
        report["max_abs_cam_diff"] = float(np.abs(torch_out[2] - ort_out[2]).max())
        report["max_abs_cam"] = scale
        report["cam_relative_tolerance"] = CAM_RELATIVE_TOLERANCE
        if report["max_abs_cam_diff"] > CAM_RELATIVE_TOLERANCE * scale:
            raise ParityError(f"onnxruntime's class activation maps disagree with PyTorch's: {report}")
    return report


def onnx_test_metrics(session, images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> tuple[dict, np.ndarray]:
    probabilities = run_batched(session, {"pixels": images})[0]
    predictions = probabilities.argmax(1)
    nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean())
    per_class = {name: float((predictions[labels == k] == k).mean()) for k, name in enumerate(label_names)}
    return {"accuracy": float((predictions == labels).mean()), "nll": nll, "images": int(len(labels)),
            "per_class_accuracy": per_class}, predictions


def training_record(run: Run) -> dict:
    """What the card says of one training run: the command that reproduces it and what it measured."""
    config, record, run_metrics = run.record["config"], run.record, run.metrics
    return {
        "command": command_for(config), "seed": config["seed"], "config": config,
        "data_files": record["data_files"], "hardware": record["hardware"], "sessions": record.get("sessions"),
        "bf16_autocast": record["bf16_autocast"], "wall_seconds": round(run_metrics["wall_seconds"], 1),
        "seconds_per_epoch": round(run_metrics["seconds_per_epoch"], 1), "epochs": len(run_metrics["history"]),
        "best_epoch": run_metrics["best_epoch"], "best_val_acc": run_metrics["best_val_acc"],
        "test_acc_torch": run_metrics["test_acc_torch"], "run": run.path.name,
    }


def ensemble_training_record(runs: list[Run]) -> dict:
    """An ensemble's card: every member's record, and the totals a reader compares against one run."""
    members = [training_record(run) for run in runs]
    return {
        "ensemble_of": len(runs), "command": " && ".join(m["command"] for m in members),
        "seed": [m["seed"] for m in members], "split_seed": split_seed(runs[0].record["config"]),
        "data_files": members[0]["data_files"], "hardware": sorted({m["hardware"] for m in members}),
        "wall_seconds": round(sum(m["wall_seconds"] for m in members), 1), "members": members,
    }


def build_card(name: str, graph: ClassifierGraph, runs: list[Run], metrics: dict, parity: dict, opset: int,
               in_shape: tuple) -> dict:
    channels, height, width = in_shape
    first = runs[0]
    record = first.record
    architecture = {"family": first.best["model_name"], "config": first.best["model_config"],
                    "parameters": count_parameters(graph.members)}
    if len(runs) > 1:
        architecture["ensemble"] = {
            "members": len(runs), "parameters_per_member": [count_parameters(m) for m in graph.members],
            "combination": "mean of the members' probabilities; embedding: the members' features concatenated"}
    return {
        "name": name,
        "task": "classification",
        "architecture": architecture,
        "input": {
            "name": "pixels", "dtype": "uint8", "shape": ["N", channels, height, width], "layout": "NCHW",
            "channels": channels, "height": height, "width": width,
            "fit": {"color": "grayscale" if channels == 1 else "rgb", "resize": "aspect-preserving, longest side to fit",
                    "padding_value": 0, "polarity": "light-on-dark",
                    "invert": "auto: inverted when most of the image's outermost frame is lighter than the midpoint of its own darkest and lightest pixel (a light background)"},
            "normalisation": {"inside_graph": True, **record["normalisation"]},
            "test_time_augmentation": TTA_DESCRIPTIONS[graph.tta],
        },
        "outputs": [
            {"name": "probabilities", "dtype": "float32", "shape": ["N", len(record["label_names"])]},
            {"name": "embedding", "dtype": "float32", "shape": ["N", graph.embedding_dim]},
            *([{"name": "cam", "dtype": "float32", "shape": ["N", len(record["label_names"]), *cam_shape(in_shape)],
                "description": "class activation maps: per class, the last feature maps weighted by the classifier's "
                               "weights plus its bias (the mean over cells is the class's logit); the mean over the "
                               "test-time views, each mirrored back"}] if graph.with_cam else []),
        ],
        "labels": record["label_names"],
        "metrics": {"split": "test", "dataset": record["config"]["dataset"],
                    "measured_by": "onnxruntime CPUExecutionProvider on the exported graph", **metrics},
        "release": release_block(classifier_targets(name), metrics),
        "training": training_record(first) if len(runs) == 1 else ensemble_training_record(runs),
        "parity": parity,
        "export": export_block(opset),
    }


def cam_shape(in_shape: tuple) -> list[int]:
    """The ResNet's last feature maps: height and width halved twice (28 -> 7)."""
    return [-(-in_shape[1] // 4), -(-in_shape[2] // 4)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, nargs="+",
                   help="a run folder written by training.train_classifier; several make one ensemble graph (their "
                        "runs must share normalisation and validation split: train them with one --split-seed)")
    p.add_argument("--name", required=True, help="model name; written to OUT/NAME/")
    p.add_argument("--out", default="models")
    p.add_argument("--parity-images", type=int, default=2000, help="test images compared with PyTorch (>= 512)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |p_onnx - p_torch|")
    p.add_argument("--tta", choices=sorted(TTA_VIEWS), default="none",
                   help="test-time augmentation inside the graph: flip (2 passes), flip-shift (10 passes)")
    p.add_argument("--choose-tta", action="store_true",
                   help="measure every --tta on the run's validation split and export the most accurate "
                        "(the cheaper one on a tie); the scores go on the card")
    p.add_argument("--max-passes", type=int,
                   help="with --choose-tta: consider only augmentations of at most this many passes per member (a "
                        "cost budget: the ResNet student may spend 5 ResNet-20 passes, 1/8 of the ensemble's 40)")
    p.add_argument("--no-cam", action="store_true",
                   help="leave out the `cam` output (class activation maps) even where the architecture has them")
    p.add_argument("--dry-run", action="store_true", help="check parity and print the card without writing")
    return with_command(p.parse_args(argv), argv)


def main(args: argparse.Namespace) -> dict:
    graph, runs = load_runs([Path(r) for r in args.run], args.tta)
    config = runs[0].record["config"]
    tta_validation = None
    if args.choose_tta:
        tta_validation = validation_accuracy_by_tta(graph, config)
        affordable = [tta for tta in TTA_VIEWS if args.max_passes is None or len(TTA_VIEWS[tta]) <= args.max_passes]
        graph.tta = max(affordable, key=lambda tta: (tta_validation[tta], -len(TTA_VIEWS[tta])))
        print(f"validation accuracy by test-time augmentation: {tta_validation}; chosen: {graph.tta}", flush=True)
    test = load_dataset(config["dataset"], "test", config["data_dir"])
    images, labels = test.images.numpy(), test.labels.numpy()
    in_shape = tuple(images.shape[1:])

    graph.with_cam = graph.supports_cam() and not args.no_cam
    example = torch.from_numpy(images[:2])
    output_names = ["probabilities", "embedding", *(["cam"] if graph.with_cam else [])]
    model_bytes = export_to_bytes(graph, (example,), ["pixels"], output_names,
                                  {"pixels": {0: torch.export.Dim("batch", min=1, max=65536)}})
    session = cpu_session(model_bytes)
    parity = check_parity(graph, session, images[:max(args.parity_images, 1)], args.tolerance)
    metrics, predictions = onnx_test_metrics(session, images, labels, test.label_names)
    card = build_card(args.name, graph, runs, metrics, parity, opset_of(model_bytes), in_shape)
    card["export"]["command"] = export_command("export.classifier", args)
    card["input"]["tta_validation_accuracy"] = tta_validation
    print(f"{args.name}: parity {parity['argmax_agreement']:.4f} argmax, max |dp| {parity['max_abs_probability_diff']:.2e}; "
          f"test accuracy (onnxruntime) {metrics['accuracy']:.4f}; {len(model_bytes) / 1e6:.2f} MB", flush=True)
    out_dir = write_unless_dry_run(args, model_bytes, card)
    if out_dir is None:
        return card | {"sha256": sha256_bytes(model_bytes)}
    matrix = confusion_matrix(labels, predictions, len(test.label_names))
    plot_confusion(matrix, test.label_names, out_dir / "confusion.png",
                   f"{args.name} (onnxruntime): test accuracy {metrics['accuracy']:.4f}")
    for k, run in enumerate(runs):
        command = command_for(run.record["config"])
        plot_curves(run.metrics["history"], out_dir / ("curves.png" if k == 0 else f"curves-member{k + 1}.png"),
                    f"{args.name}: {command}", run.record["config"]["label_smoothing"])
    return json.loads((out_dir / "card.json").read_text())


if __name__ == "__main__":
    main(parse_args())
