"""Export a trained autoencoder run to models/<name>/{model.onnx, card.json} behind a parity gate.
`python -m export.autoencoder` reads as "export the autoencoder"; the network itself is defined in training/models/.

    python -m export.autoencoder --run runs/autoencoder/<stamp> --name autoencoder

The graph is the whole model: uint8 pixels [N, 1, 28, 28] -> [0, 1] -> encoder -> decoder, with outputs
`reconstruction` uint8 [N, 1, 28, 28] (rounded inside the graph), `error` float32 [N] (the mean squared
difference per pixel between the input and the unrounded reconstruction, pixels in [0, 1]: an
out-of-distribution score) and `code` float32 [N, D] (the bottleneck, for the embedding maps). Before anything
is written the graph must pass onnx.checker and agree with PyTorch on real test images (reconstructions within
one grey level, errors within 1e-6 absolute); the card's figures are then measured by onnxruntime on the
exported graph over the whole test split, per class.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_io import (ParityError, add_export_flags, cpu_session, export_block, export_command, export_to_bytes,
                            opset_of, run_batched, sha256_bytes, with_command, write_unless_dry_run)
from export.release import Target, release_block, say_floor_problems
from training.data import load_dataset
from training.models import count_parameters
from training.models.autoencoder import Autoencoder, AutoencoderConfig
from training.plots import save_image_grid
from training.train_autoencoder import command_for, plot_curves

MAX_GREY_LEVEL_DIFF = 1
ERROR_TOLERANCE = 1e-6

# The test error's goal is a direction, not a gate (export/release.py): 0.005 per pixel is an RMS error of about
# 18 grey levels, where a garment's texture starts to survive. The floor marks a broken autoencoder: one no better
# than answering every image with the training set's mean image, whose error is measured at export, not assumed.
GOAL_TEST_MSE = 0.005


class AutoencoderGraph(nn.Module):
    """uint8 pixels in; the uint8 reconstruction, the per-image error and the code out."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = pixels.to(torch.float32) / 255.0
        code = self.model.encode(x)
        y = self.model.decode(code)
        error = (y - x).pow(2).flatten(1).mean(1)
        reconstruction = (y * 255.0).round().clamp(0, 255).to(torch.uint8)
        return reconstruction, error, code


def load_run(run_dir: Path) -> tuple[AutoencoderGraph, dict, dict, dict]:
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    cfg = best["model_config"]
    model = Autoencoder(AutoencoderConfig(in_shape=tuple(cfg["in_shape"]), channels=cfg["channels"],
                                          code_dim=cfg["code_dim"]))
    model.load_state_dict(best["model"])
    record = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return AutoencoderGraph(model.eval()).eval(), best, record, metrics


def check_parity(graph: AutoencoderGraph, session, images: np.ndarray) -> dict:
    with torch.no_grad():
        torch_rec, torch_err, torch_code = (t.numpy() for t in graph(torch.from_numpy(images)))
    ort_rec, ort_err, ort_code = run_batched(session, {"pixels": images})
    grey = np.abs(torch_rec.astype(np.int16) - ort_rec.astype(np.int16))
    report = {"images": int(len(images)), "max_abs_grey_level_diff": int(grey.max()),
              "identical_pixels": float((grey == 0).mean()), "max_abs_error_diff": float(np.abs(torch_err - ort_err).max()),
              "max_abs_code_diff": float(np.abs(torch_code - ort_code).max()),
              "tolerance_grey_levels": MAX_GREY_LEVEL_DIFF, "tolerance_error": ERROR_TOLERANCE,
              "output_dtypes": [str(ort_rec.dtype), str(ort_err.dtype)]}
    if (ort_rec.dtype != np.uint8 or ort_err.dtype != np.float32 or grey.max() > MAX_GREY_LEVEL_DIFF
            or report["max_abs_error_diff"] > ERROR_TOLERANCE):
        raise ParityError(f"onnxruntime disagrees with PyTorch: {report}")
    return report


def mean_image_error(train_images: np.ndarray, test_images: np.ndarray) -> float:
    """The test error of answering every image with the training set's mean image: what a broken net does."""
    mean = train_images.astype(np.float32).mean(0) / 255.0
    return float(((test_images.astype(np.float32) / 255.0 - mean) ** 2).reshape(len(test_images), -1).mean(1).mean())


def targets(baseline: float) -> tuple[Target, ...]:
    return (Target("test_mse", "test reconstruction MSE", goal=GOAL_TEST_MSE, floor=baseline, higher_is_better=False),)


def test_metrics(session, images: np.ndarray, labels: np.ndarray, label_names: list[str], baseline: float) -> dict:
    _, errors, _ = run_batched(session, {"pixels": images})
    return {"split": "test", "images": int(len(images)), "test_mse": float(errors.mean()),
            "test_mse_median": float(np.median(errors)), "test_mse_p95": float(np.percentile(errors, 95)),
            "per_class_test_mse": {name: float(errors[labels == k].mean()) for k, name in enumerate(label_names)},
            "mean_image_baseline_mse": baseline,
            "error_definition": "mean over an image's pixels of (reconstruction - input)^2, pixels in [0, 1]"}


def build_card(name: str, graph: AutoencoderGraph, record: dict, run_metrics: dict, metrics: dict, parity: dict,
               opset: int, run_dir: Path, baseline: float) -> dict:
    cfg = graph.model.cfg
    c, h, w = cfg.in_shape
    config = record["config"]
    return {
        "name": name,
        "task": "reconstruction",
        "architecture": {"family": "autoencoder", "config": record["model_config"],
                         "parameters": count_parameters(graph.model),
                         "description": "conv 3x3/2 (k) - conv 3x3/2 (2k) - linear to the code; linear - "
                                        "transposed conv 4x4/2 (k) - transposed conv 4x4/2 - sigmoid"},
        "input": {
            "name": "pixels", "dtype": "uint8", "shape": ["N", c, h, w], "layout": "NCHW",
            "channels": c, "height": h, "width": w,
            "fit": {"grayscale": c == 1, "resize": "aspect-preserving, longest side to fit", "padding_value": 0,
                    "polarity": "light-on-dark"},
        },
        "outputs": [
            {"name": "reconstruction", "dtype": "uint8", "shape": ["N", c, h, w], "layout": "NCHW"},
            {"name": "error", "dtype": "float32", "shape": ["N"],
             "description": "mean squared difference per pixel between the input and its unrounded reconstruction, "
                            "pixels in [0, 1]; larger for images unlike the training set"},
            {"name": "code", "dtype": "float32", "shape": ["N", cfg.code_dim], "description": "the bottleneck"},
        ],
        "labels": record["label_names"],
        "metrics": {"measured_by": "onnxruntime CPUExecutionProvider on the exported graph",
                    "dataset": config["dataset"], **metrics},
        "release": release_block(targets(baseline), metrics),
        "training": {
            "command": command_for(config), "seed": config["seed"], "config": config,
            "data_files": record["data_files"], "hardware": record["hardware"], "sessions": record.get("sessions"),
            "wall_seconds": round(run_metrics["wall_seconds"], 1),
            "seconds_per_epoch": round(run_metrics["seconds_per_epoch"], 1), "epochs": len(run_metrics["history"]),
            "best_epoch": run_metrics["best_epoch"], "best_val_mse": run_metrics["best_val_mse"], "run": run_dir.name,
        },
        "parity": parity,
        "export": export_block(opset),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_flags(p, "training.train_autoencoder")
    p.add_argument("--parity-images", type=int, default=2000)
    p.add_argument("--dry-run", action="store_true", help="check parity and print the card without writing")
    return with_command(p.parse_args(argv), argv)


def main(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run)
    graph, best, record, run_metrics = load_run(run_dir)
    c, h, w = graph.model.cfg.in_shape
    batch = torch.export.Dim("batch", min=1, max=65536)
    model_bytes = export_to_bytes(graph, (torch.zeros(2, c, h, w, dtype=torch.uint8),), ["pixels"],
                                  ["reconstruction", "error", "code"], {"pixels": {0: batch}})
    session = cpu_session(model_bytes)
    config = record["config"]
    test = load_dataset(config["dataset"], "test", config["data_dir"])
    train = load_dataset(config["dataset"], "train", config["data_dir"])
    images, labels = test.images.numpy(), test.labels.numpy()
    parity = check_parity(graph, session, images[:args.parity_images])
    baseline = mean_image_error(train.images.numpy(), images)
    metrics = test_metrics(session, images, labels, test.label_names, baseline)
    card = build_card(args.name, graph, record, run_metrics, metrics, parity, opset_of(model_bytes), run_dir, baseline)
    card["export"]["command"] = export_command("export.autoencoder", args)
    print(f"{args.name}: parity max {parity['max_abs_grey_level_diff']} grey level(s), error diff "
          f"{parity['max_abs_error_diff']:.2e}; {card['release']['summary']}; mean-image baseline {baseline:.5f}; "
          f"{len(model_bytes) / 1e6:.2f} MB", flush=True)
    say_floor_problems(args.name, targets(baseline), metrics)
    out_dir = write_unless_dry_run(args, model_bytes, card)
    if out_dir is None:
        return card | {"sha256": sha256_bytes(model_bytes)}
    picks = [int(i) for k in range(len(test.label_names)) for i in np.flatnonzero(labels == k)[:2]]
    (reconstructions, errors, _) = session.run(None, {"pixels": images[picks]})
    save_image_grid(np.concatenate([images[picks], reconstructions]), out_dir / "reconstructions.png",
                    columns=len(picks), row_labels=["test image", "reconstruction"],
                    title=f"{args.name} (onnxruntime): two test images per class above their reconstructions; "
                          f"test MSE {metrics['test_mse']:.5f}")
    plot_curves(run_metrics["history"], out_dir / "curves.png", f"{args.name}: {card['training']['command']}")
    return json.loads((out_dir / "card.json").read_text())


if __name__ == "__main__":
    main(parse_args())
