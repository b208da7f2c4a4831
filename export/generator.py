"""Export a trained DCGAN generator to models/<name>/{model.onnx, card.json} behind a parity gate.
`python -m export.generator` reads as "export the generator"; the network itself is defined in training/models/.

    python -m export.generator --run runs/dcgan/<stamp> --name dcgan --judge models/resnet

The graph is the whole generator: z float32 [N, Z] and label int64 [N] in, pixels uint8 [N, C, 28, 28] out
(tanh -> [0, 255], rounded, inside the graph), batch dynamic. Before anything is written the graph must
pass onnx.checker and agree with PyTorch within one grey level on 2,000 samples; the card's metrics are
then measured on the exported graph by export.evaluate_generator (FID, KID, precision and recall in the
released CNN's features against the training-images reference, class consistency by the released ResNet),
and a grid of samples beside real test images is saved next to it. A run trained with --ema-decay exports its
averaged generator; --live-weights exports the live one instead, for comparing the two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.evaluate_generator import SAMPLES_PER_CLASS, comparison_grid, evaluation_inputs, judge_generator
from export.onnx_io import (ParityError, add_export_flags, cpu_session, export_block, export_command, export_to_bytes,
                            opset_of, run_batched, sha256_bytes, with_command, write_unless_dry_run)
from export.release import GENERATOR_TARGETS, release_block, say_floor_problems
from training.data import load_dataset
from training.models import count_parameters
from training.models.dcgan import DCGANConfig, Generator
from training.plots import plot_gan_curves, save_image_grid
from training.train_dcgan import command_for, to_uint8

MAX_GREY_LEVEL_DIFF = 1
PARITY_NOISE_SEED = 50_000_007


class GeneratorGraph(nn.Module):
    """Noise and class in, uint8 pixels out: the service never rescales a generator's output."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.generator(z, label))


def load_run(run_dir: Path, live_weights: bool = False) -> tuple[GeneratorGraph, dict, dict, dict]:
    saved = torch.load(run_dir / "generator.pt", map_location="cpu", weights_only=False)
    saved.setdefault("weights", "live")  # runs from before --ema-decay
    if live_weights and saved["weights"] != "live":
        saved = {**saved, "generator": saved["generator_live"], "weights": "live"}
    generator = Generator(DCGANConfig(**saved["model_config"]))
    generator.load_state_dict(saved["generator"])
    graph = GeneratorGraph(generator.eval()).eval()
    record = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return graph, saved, record, metrics


def check_parity(graph: GeneratorGraph, session, samples: int) -> dict:
    cfg = graph.generator.cfg
    z, labels = evaluation_inputs(cfg.z_dim, cfg.num_classes, -(-samples // cfg.num_classes), PARITY_NOISE_SEED)
    with torch.no_grad():
        torch_pixels = graph(torch.from_numpy(z), torch.from_numpy(labels)).numpy()
    (ort_pixels,) = run_batched(session, {"z": z, "label": labels}, batch_size=500)
    diff = np.abs(torch_pixels.astype(np.int16) - ort_pixels.astype(np.int16))
    report = {"samples": int(len(z)), "max_abs_grey_level_diff": int(diff.max()),
              "identical_pixels": float((diff == 0).mean()), "tolerance_grey_levels": MAX_GREY_LEVEL_DIFF,
              "output_dtype": str(ort_pixels.dtype), "output_shape": list(ort_pixels.shape[1:])}
    if ort_pixels.dtype != np.uint8 or diff.max() > MAX_GREY_LEVEL_DIFF:
        raise ParityError(f"onnxruntime disagrees with PyTorch: {report}")
    return report


def conditioning(config: dict) -> str:
    words = "class embedding concatenated with z; projection discriminator in training"
    if config.get("aux_weight"):
        words += f", with an auxiliary class head (AC-GAN, weight {config['aux_weight']:g})"
    if config.get("ema_decay"):
        words += f"; released weights: moving average (decay {config['ema_decay']:g})"
    return words


def build_card(name: str, graph: GeneratorGraph, record: dict, run_metrics: dict, metrics: dict, parity: dict,
               opset: int, run_dir: Path, weights: str = "live") -> dict:
    cfg = graph.generator.cfg
    config = record["config"]
    return {
        "name": name,
        "task": "generation",
        "architecture": {"family": "dcgan", "conditioning": conditioning(config), "config": record["model_config"],
                         "parameters": count_parameters(graph.generator)},
        "inputs": [
            {"name": "z", "dtype": "float32", "shape": ["N", cfg.z_dim], "distribution": "standard normal"},
            {"name": "label", "dtype": "int64", "shape": ["N"], "range": [0, cfg.num_classes - 1]},
        ],
        "outputs": [{"name": "pixels", "dtype": "uint8", "shape": ["N", cfg.channels, cfg.image_size, cfg.image_size],
                     "layout": "NCHW", "polarity": "light-on-dark"}],
        "labels": record["label_names"],
        "metrics": {"measured_by": "export.evaluate_generator: onnxruntime CPUExecutionProvider on the exported "
                                   "graph, the feature network's and the judge's", "dataset": config["dataset"],
                    **metrics},
        "release": release_block(GENERATOR_TARGETS, metrics),
        "training": {
            "command": command_for(config), "seed": config["seed"], "config": config,
            "data_files": record["data_files"], "hardware": record["hardware"], "sessions": record.get("sessions"),
            "wall_seconds": round(run_metrics["wall_seconds"], 1),
            "seconds_per_epoch": round(run_metrics["seconds_per_epoch"], 1), "epochs": run_metrics["epochs"],
            "final_losses": {k: run_metrics["history"][-1][k] for k in ("loss_d", "loss_g", "d_real", "d_fake")},
            "run": run_dir.name, "weights": weights,
        },
        "parity": parity,
        "export": export_block(opset),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_flags(p, "training.train_dcgan")
    p.add_argument("--features", default="models/cnn", help="the released classifier whose embedding is the feature space")
    p.add_argument("--judge", default="models/resnet", help="the released classifier that judges class consistency")
    p.add_argument("--per-class", type=int, default=SAMPLES_PER_CLASS, help="samples per class for the metrics")
    p.add_argument("--parity-samples", type=int, default=2000)
    p.add_argument("--live-weights", action="store_true",
                   help="for a run trained with --ema-decay: export the live generator, not the averaged one")
    p.add_argument("--dry-run", action="store_true", help="check parity and print the card without writing")
    return with_command(p.parse_args(argv), argv)


def main(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run)
    graph, saved, record, run_metrics = load_run(run_dir, args.live_weights)
    cfg = graph.generator.cfg
    example = (torch.zeros(2, cfg.z_dim), torch.zeros(2, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=65536)
    model_bytes = export_to_bytes(graph, example, ["z", "label"], ["pixels"], {"z": {0: batch}, "label": {0: batch}})
    session = cpu_session(model_bytes)
    parity = check_parity(graph, session, args.parity_samples)

    config = record["config"]
    metrics = judge_generator(session, Path(args.features), Path(args.judge), config["dataset"], config["data_dir"],
                              cfg.z_dim, record["label_names"], args.per_class)
    card = build_card(args.name, graph, record, run_metrics, metrics, parity, opset_of(model_bytes), run_dir,
                      saved["weights"])
    card["export"]["command"] = export_command("export.generator", args)
    print(f"{args.name} ({saved['weights']} weights): parity max {parity['max_abs_grey_level_diff']} grey level(s); "
          f"FID {metrics['fid']:.3f} against the reference's {metrics['reference']['fid']:.3f} "
          f"({metrics['fid_to_reference']:.2f}x); KID {metrics['kid_mean']:.5f}; precision {metrics['precision']:.3f}, "
          f"recall {metrics['recall']:.3f}; class consistency {metrics['class_consistency']:.2%}; "
          f"{len(model_bytes) / 1e6:.2f} MB; {card['release']['summary']}", flush=True)
    say_floor_problems(args.name, GENERATOR_TARGETS, metrics)
    out_dir = write_unless_dry_run(args, model_bytes, card)
    if out_dir is None:
        return card | {"sha256": sha256_bytes(model_bytes)}
    test = load_dataset(config["dataset"], "test", config["data_dir"])
    grid = comparison_grid(session, cfg.z_dim, test.images.numpy(), test.labels.numpy(), cfg.num_classes)
    save_image_grid(grid, out_dir / "samples.png", columns=21, row_labels=record["label_names"],
                    title=f"{args.name} (onnxruntime): 10 samples per class (left) beside 10 test images; "
                          f"consistency {metrics['class_consistency']:.1%}")
    plot_gan_curves(run_metrics["history"], out_dir / "curves.png", f"{args.name}: {card['training']['command']}")
    return json.loads((out_dir / "card.json").read_text())


if __name__ == "__main__":
    main(parse_args())
