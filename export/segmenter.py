"""Export a trained SegNet run to models/<name>/{model.onnx, card.json, *.png} behind a parity gate.
`python -m export.segmenter` reads as "export the segmenter"; the network itself is defined in training/models/.

    python -m export.segmenter --run runs/segnet/<stamp> --name segnet

The graph is the whole model: uint8 pixels [N,1,H,W] (dynamic N, H and W, H and W multiples of the stride)
-> normalisation -> SegNet -> per-pixel softmax, with outputs `mask` uint8 [N,H,W] (the argmax, taken inside
the graph) and `probabilities` float32 [N,11,H,W]. Before anything is written the graph must pass
onnx.checker and agree with PyTorch on test scenes at two sizes, the training canvas and a non-square one
(masks equal on at least 99.9% of pixels; pooling switches that differ only at near-ties; with the same
switches, probabilities within --tolerance everywhere: see check_parity). The card's metrics are then
measured by onnxruntime on the exported graph over the 2,000 fixed test scenes built from test images only.
`--tta flip` builds a graph that also runs the mirror image and averages the two softmaxes (twice the
compute; recorded on the card).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.classifier import TTA_DESCRIPTIONS
from export.onnx_io import (ParityError, add_export_flags, cpu_session, export_block, export_command, export_to_bytes,
                            opset_of, sha256_bytes, with_command, write_unless_dry_run)
from export.release import SEGMENTER_TARGETS, release_block, say_floor_problems
from training.data import load_dataset
from training.metrics import item_coverage, pixel_confusion, segmentation_scores
from training.models import build_segmenter, count_parameters
from training.plots import MASK_PALETTE, plot_class_iou, plot_scenes, plot_segmentation_curves
from training.scenes import TEST_SCENE_SEED, TEST_SCENES, fixed_test_scenes, make_scenes
from training.train_segnet import command_for

# Parity scenes at a second, non-square size use their own seed so they are not the metric scenes again.
PARITY_SCENE_SEED = 40_000_004
MIN_MASK_AGREEMENT = 0.999
# Two pooling candidates closer than this may be ordered either way by two float32 runtimes (their conv
# results differ by up to ~1e-5 here); a switch that flips across a wider gap is a real disagreement.
NEAR_TIE = 1e-4
# Test-time augmentation the segmenter's graph can carry: the classifiers' "flip", per pixel.
SEGMENTER_TTA = ["none", "flip"]


class SegmenterGraph(nn.Module):
    """Raw uint8 pixels in, a class per pixel and its probabilities out: no preprocessing outside the graph.

    With tta="flip" the graph runs the network on the image and on its mirror image and averages the two
    softmaxes (the mirror's flipped back): garments are left-right symmetric and training mirrors items, so
    this is the classifiers' flip test-time augmentation, per pixel, for twice the compute. The card says so.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], tta: str = "none"):
        super().__init__()
        if tta not in SEGMENTER_TTA:
            raise ValueError(f"tta must be one of {SEGMENTER_TTA}, not {tta!r}")
        self.model = model
        self.stride = model.stride
        self.tta = tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) / 255.0 - self.mean) / self.std  # same arithmetic as training.data.normalise

    def passes(self) -> int:
        return 2 if self.tta == "flip" else 1

    def probabilities_with_switches(self, pixels: torch.Tensor, switches: list[torch.Tensor] | None = None
                                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Probabilities, the pooling switches of every pass (stages of the plain pass, then of the mirrored
        one) and each stage's pooling input; with `switches` given, the passes replay them (see check_parity)."""
        x = self.normalise(pixels)
        stages = len(self.model.encoder)
        scores, used, pooled_from = self.model.forward_with_switches(x, None if switches is None else switches[:stages])
        probabilities = torch.softmax(scores, dim=1)  # N x K x H x W
        if self.tta == "flip":
            mirrored, used_m, pooled_m = self.model.forward_with_switches(
                x.flip(3), None if switches is None else switches[stages:])
            probabilities = (probabilities + torch.softmax(mirrored, dim=1).flip(3)) / 2
            used, pooled_from = used + used_m, pooled_from + pooled_m
        return probabilities, used, pooled_from

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.probabilities_with_switches(pixels)[0]
        # Argmax of the probabilities that are returned, so a client never sees a mask that disagrees with them.
        mask = probabilities.argmax(dim=1).to(torch.uint8)                 # N x H x W
        return mask, probabilities


class SwitchesGraph(nn.Module):
    """The same network with its pooling switches as outputs: a diagnostic graph for the parity check only,
    never written; it lets PyTorch replay onnxruntime's switch choices."""

    def __init__(self, segmenter: SegmenterGraph):
        super().__init__()
        self.segmenter = segmenter  # not `graph`: torch.fx's GraphModule owns that name during export
        self.stride = segmenter.stride

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.segmenter.probabilities_with_switches(pixels)[1])


def switches_session(graph: SegmenterGraph, example: torch.Tensor):
    """onnxruntime running the diagnostic SwitchesGraph of `graph` (exported the same way, never written)."""
    names = tuple(f"switches_{i}" for i in range(len(graph.model.encoder) * graph.passes()))
    return cpu_session(export_graph(SwitchesGraph(graph), example, names))


def load_run(run_dir: Path, tta: str = "none") -> tuple[SegmenterGraph, dict, dict, dict]:
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    model, _ = build_segmenter(best["model_name"], **best["model_config"])
    model.load_state_dict(best["model"])
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    graph = SegmenterGraph(model, best["normalisation"]["mean"], best["normalisation"]["std"], tta).eval()
    record = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return graph, best, record, metrics


def export_graph(graph: nn.Module, example: torch.Tensor, output_names: tuple[str, ...] = ("mask", "probabilities")
                 ) -> bytes:
    # H and W are declared as stride * k: the exporter then knows every pooled map unpools to its exact size.
    dims = {0: torch.export.Dim("batch", min=1, max=65536),
            2: graph.stride * torch.export.Dim("height_blocks", min=1, max=4096),
            3: graph.stride * torch.export.Dim("width_blocks", min=1, max=4096)}
    return export_to_bytes(graph, (example,), ["pixels"], list(output_names), {"pixels": dims})


def check_parity(graph: SegmenterGraph, session, switch_session, scene_sets: list[np.ndarray], tolerance: float,
                 batch_size: int = 100) -> dict:
    """Compare onnxruntime with PyTorch on every set of scenes (one per size); ParityError when they differ.

    SegNet's max-pooling switches are hard choices. Where a 2x2 window's two largest values differ by less
    than the runtimes' float32 rounding (their conv results differ by up to ~1e-5; gaps of 3e-8 to 1.3e-6
    were seen), PyTorch and onnxruntime pick different positions and the unpooled value lands one pixel
    apart, moving a small patch of probabilities by up to ~0.3 (3-6 windows per stage per 200 scenes).
    So the gate checks what parity means for such a network, from the switches of a diagnostic export:
    every switch the runtimes choose differently is a near-tie (values within NEAR_TIE in PyTorch); with
    onnxruntime's switches replayed in PyTorch, probabilities agree within `tolerance` on every pixel;
    and the two masks agree on >= 99.9% of pixels. The plain worst difference is reported as well.
    """
    report = {"sizes": [], "tolerance": tolerance, "min_mask_agreement": MIN_MASK_AGREEMENT, "near_tie": NEAR_TIE}
    for images in scene_sets:
        agree, pixels, max_diff, replay_diff, flips, windows, widest_flip = 0, 0, 0.0, 0.0, 0, 0, 0.0
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            ort_mask, ort_probs = session.run(None, {"pixels": chunk})
            ort_switches = [torch.from_numpy(s) for s in switch_session.run(None, {"pixels": chunk})]
            with torch.no_grad():
                torch_probs, switches, pooled_from = graph.probabilities_with_switches(torch.from_numpy(chunk))
                replayed = graph.probabilities_with_switches(torch.from_numpy(chunk), ort_switches)[0].numpy()
            for mine, theirs, features in zip(switches, ort_switches, pooled_from):
                differ = mine != theirs
                windows += differ.numel()
                if differ.any():
                    flat = features.flatten(2)
                    at_mine = flat.gather(2, mine.flatten(2)).view(mine.shape)[differ]
                    at_theirs = flat.gather(2, theirs.flatten(2)).view(theirs.shape)[differ]
                    flips += int(differ.sum())
                    widest_flip = max(widest_flip, float((at_mine - at_theirs).abs().max()))
            agree += int((torch_probs.argmax(1).to(torch.uint8).numpy() == ort_mask).sum())
            pixels += ort_mask.size
            max_diff = max(max_diff, float(np.abs(torch_probs.numpy() - ort_probs).max()))
            replay_diff = max(replay_diff, float(np.abs(replayed - ort_probs).max()))
        report["sizes"].append({"height": int(images.shape[2]), "width": int(images.shape[3]),
                                "scenes": int(len(images)), "mask_agreement": agree / pixels,
                                "max_abs_probability_diff": max_diff, "switch_flips": flips,
                                "switch_windows": windows, "widest_flipped_gap": widest_flip,
                                "max_abs_probability_diff_same_switches": replay_diff})
    report["mask_agreement"] = min(s["mask_agreement"] for s in report["sizes"])
    report["max_abs_probability_diff"] = max(s["max_abs_probability_diff"] for s in report["sizes"])
    report["widest_flipped_gap"] = max(s["widest_flipped_gap"] for s in report["sizes"])
    report["max_abs_probability_diff_same_switches"] = max(
        s["max_abs_probability_diff_same_switches"] for s in report["sizes"])
    if (report["mask_agreement"] < MIN_MASK_AGREEMENT or report["widest_flipped_gap"] > NEAR_TIE
            or report["max_abs_probability_diff_same_switches"] > tolerance):
        raise ParityError(f"onnxruntime disagrees with PyTorch: {report}")
    return report


def onnx_test_metrics(session, test, label_names: list[str], batch_size: int = 100) -> tuple[dict, np.ndarray]:
    """Per-class IoU, mIoU and pixel accuracy of the graph's `mask` output on the scenes `test`, with where the
    errors are (item_coverage: outlines found, garments named, background kept); the predicted masks too."""
    images, masks = test.images.numpy(), test.masks.numpy()
    predicted = np.concatenate([session.run(["mask"], {"pixels": images[i:i + batch_size]})[0]
                                for i in range(0, len(images), batch_size)])
    confusion = pixel_confusion(torch.from_numpy(masks), torch.from_numpy(predicted), len(label_names))
    scores = segmentation_scores(confusion, label_names)
    return {"scenes": int(len(images)), **scores, **item_coverage(test, predicted),
            "confusion_matrix": confusion.tolist()}, predicted


def build_card(name: str, graph: SegmenterGraph, best: dict, record: dict, run_metrics: dict, metrics: dict,
               parity: dict, opset: int, run_dir: Path) -> dict:
    config = record["config"]
    height, width = config["canvas"]
    k = len(record["label_names"])
    return {
        "name": name,
        "task": "segmentation",
        "architecture": {"family": best["model_name"], "config": best["model_config"],
                         "parameters": count_parameters(graph.model), "stride": graph.stride},
        "input": {
            "name": "pixels", "dtype": "uint8", "shape": ["N", 1, "H", "W"], "layout": "NCHW", "channels": 1,
            "height": "H", "width": "W", "stride": graph.stride, "multiple_of": graph.stride,
            "trained_height": height, "trained_width": width,
            "fit": {"color": "grayscale", "resize": "none: the image keeps its size",
                    "pad": f"pad to a multiple of the stride ({graph.stride}) at the bottom and right with "
                           "padding_value, run, crop the outputs back to the input's height and width",
                    "padding_value": 0, "polarity": "light-on-dark",
                    "invert": "auto: inverted when most of the image's outermost frame is lighter than the midpoint of its own darkest and lightest pixel (a light background)"},
            "normalisation": {"inside_graph": True, **record["normalisation"]},
            "test_time_augmentation": TTA_DESCRIPTIONS[graph.tta],
        },
        "outputs": [
            {"name": "mask", "dtype": "uint8", "shape": ["N", "H", "W"],
             "meaning": "class index per pixel: argmax of probabilities, taken inside the graph"},
            {"name": "probabilities", "dtype": "float32", "shape": ["N", k, "H", "W"],
             "meaning": "per-pixel softmax over the labels" + (
                 ", the mean of the image's and its mirror image's (flipped back)" if graph.tta == "flip" else "")},
        ],
        "labels": record["label_names"],
        "palette": [list(c) for c in MASK_PALETTE[:k]],
        "metrics": {"split": "test", "dataset": config["dataset"],
                    "measured_by": "onnxruntime CPUExecutionProvider on the exported graph",
                    "scenes_spec": record["scenes"],
                    **metrics},
        "release": release_block(SEGMENTER_TARGETS, metrics),
        "training": {
            "command": command_for(config), "seed": config["seed"], "config": config,
            "data_files": record["data_files"], "hardware": record["hardware"], "sessions": record.get("sessions"),
            "bf16_autocast": record["bf16_autocast"], "wall_seconds": round(run_metrics["wall_seconds"], 1),
            "seconds_per_epoch": round(run_metrics["seconds_per_epoch"], 1), "epochs": len(run_metrics["history"]),
            "best_epoch": run_metrics["best_epoch"], "best_val_miou": run_metrics["best_val_miou"],
            "test_miou_torch": run_metrics["test_torch"]["miou"], "run": run_dir.name,
        },
        "parity": parity,
        "export": export_block(opset),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_flags(p, "training.train_segnet")
    p.add_argument("--parity-scenes", type=int, default=500, help="test scenes compared with PyTorch at each size")
    p.add_argument("--parity-size", type=int, nargs=2, default=[48, 80], metavar=("H", "W"),
                   help="the second, non-square parity size (multiples of the stride)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |p_onnx - p_torch| with the same pooling switches")
    p.add_argument("--tta", choices=SEGMENTER_TTA, default="none",
                   help="test-time augmentation inside the graph: flip averages the softmax of the image and of "
                        "its mirror image (2 passes)")
    p.add_argument("--dry-run", action="store_true", help="check parity and print the card without writing")
    return with_command(p.parse_args(argv), argv)


def main(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run)
    graph, best, record, run_metrics = load_run(run_dir, args.tta)
    config = record["config"]
    height, width = config["canvas"]
    if any(side % graph.stride for side in args.parity_size):
        raise ValueError(f"--parity-size {args.parity_size} must be multiples of the stride {graph.stride}")
    test_items = load_dataset(config["dataset"], "test", config["data_dir"])
    test = fixed_test_scenes(TEST_SCENES, TEST_SCENE_SEED, height, width, test=test_items)
    images, masks = test.images.numpy(), test.masks.numpy()
    other = make_scenes(test_items, args.parity_scenes, PARITY_SCENE_SEED, *args.parity_size).images.numpy()

    model_bytes = export_graph(graph, torch.from_numpy(images[:2]))
    session = cpu_session(model_bytes)
    switch_session = switches_session(graph, torch.from_numpy(images[:2]))
    parity = check_parity(graph, session, switch_session, [images[:args.parity_scenes], other], args.tolerance)
    metrics, predicted = onnx_test_metrics(session, test, record["label_names"])
    card = build_card(args.name, graph, best, record, run_metrics, metrics, parity, opset_of(model_bytes), run_dir)
    card["export"]["command"] = export_command("export.segmenter", args)
    print(f"{args.name}: parity mask agreement {parity['mask_agreement']:.5f}, max |dp| "
          f"{parity['max_abs_probability_diff']:.2e} ({parity['max_abs_probability_diff_same_switches']:.2e} with the "
          f"same switches; widest flipped gap {parity['widest_flipped_gap']:.1e}); test (onnxruntime) mIoU {metrics['miou']:.4f}, "
          f"pixel accuracy {metrics['pixel_accuracy']:.4f}; {len(model_bytes) / 1e6:.2f} MB; "
          f"{card['release']['summary']}", flush=True)
    say_floor_problems(args.name, SEGMENTER_TARGETS, metrics)
    out_dir = write_unless_dry_run(args, model_bytes, card)
    if out_dir is None:
        return card | {"sha256": sha256_bytes(model_bytes)}
    plot_class_iou(metrics["per_class_iou"], out_dir / "class_iou.png",
                   f"{args.name} (onnxruntime): test IoU per class, {metrics['scenes']} scenes")
    plot_segmentation_curves(run_metrics["history"], out_dir / "curves.png",
                             f"{args.name}: {card['training']['command']}")
    plot_scenes(images[:8], masks[:8], record["label_names"], out_dir / "test_overlay.png", predictions=predicted[:8],
                title=f"{args.name} (onnxruntime): test scenes, prediction vs truth")
    return json.loads((out_dir / "card.json").read_text())


if __name__ == "__main__":
    main(parse_args())
